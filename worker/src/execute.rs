//! The executors: plain functions of their inputs (no network, no database), run on blocking
//! threads by the stages. Errors say whether another attempt can help ([`JobError`]).

use proofmesh_circuits::basic::{chunk_inputs, BasicCircuit};
use proofmesh_circuits::batch::Batch;
use proofmesh_circuits::job_input::EncodedInput;
use proofmesh_circuits::prover::witness;
use proofmesh_circuits::setup::{CircuitKey, SetupStore};
use proofmesh_circuits::state::replay;
use proofmesh_circuits::witness_vector::{self, WitnessVector};
use proofmesh_core::{keys, AggregationRound, BatchNumber, CircuitId, Geometry, ProtocolVersion};

use crate::runner::JobError;
use crate::setups::Setups;

/// What witness generation produced: circuit inputs under their keys, and the count per circuit id.
#[derive(Debug, Default)]
pub struct Circuits {
    /// `(artifact key, circuit-input bytes)`, one per circuit.
    pub inputs: Vec<(String, Vec<u8>)>,
    /// Circuits per circuit id, in circuit-id order.
    pub counts: Vec<(CircuitId, u32)>,
}

/// Which witness-generation job: the round, circuit id and depth whose circuits it builds.
#[derive(Debug, Clone, Copy)]
pub struct WgJob {
    /// The batch.
    pub batch: BatchNumber,
    /// Its protocol version.
    pub version: ProtocolVersion,
    /// Its geometry.
    pub geometry: Geometry,
    /// The round whose circuits are built.
    pub round: AggregationRound,
    /// The circuit id (rounds 1 and 2).
    pub circuit_id: CircuitId,
    /// Node depth (round 2).
    pub depth: u8,
}

/// Witness generation of one job. `inputs` are, for round 0, the batch file; for rounds 1 and 2
/// the proofs to aggregate in sequence order; for round 3 the top node proof of each type (with
/// `depths`); for round 4 the recursion tip proof.
///
/// Errors (not retryable): a batch that does not parse or replay, or inputs of the wrong count.
pub fn witness_generation(job: WgJob, inputs: Vec<Vec<u8>>, depths: &[u32]) -> Result<Circuits, JobError> {
    let b = job.batch;
    let key = |round, id, depth, seq| keys::circuit_input(b, round, id, depth, seq);
    let mut out = Circuits::default();
    match job.round {
        AggregationRound::BasicCircuits => {
            let [bytes] = <[Vec<u8>; 1]>::try_from(inputs).map_err(|_| JobError::fatal("round 0 takes one batch file"))?;
            let batch = Batch::from_bytes(&bytes).map_err(|e| JobError::fatal(format!("batch {b}: {e}")))?;
            if batch.number != b {
                return Err(JobError::fatal(format!("the file holds batch {}, not batch {b}", batch.number)));
            }
            if batch.state_tree_depth != job.geometry.state_tree_depth {
                return Err(JobError::fatal(format!(
                    "batch {b} has a state tree of depth {}, the geometry expects {}",
                    batch.state_tree_depth, job.geometry.state_tree_depth
                )));
            }
            let replay = replay(&batch).map_err(|e| JobError::fatal(format!("batch {b}: {e}")))?;
            for t in BasicCircuit::ALL {
                let chunks = chunk_inputs(&batch, &replay, &job.geometry, t);
                out.counts.push((t.id(), chunks.len() as u32));
                for (seq, input) in chunks.into_iter().enumerate() {
                    out.inputs.push((key(job.round, t.id(), 0, seq as u32), EncodedInput::Basic(input).to_bytes()));
                }
            }
        }
        AggregationRound::LeafAggregation | AggregationRound::NodeAggregation => {
            let inner = aggregated_circuit(&job)?;
            let fan_in = match job.round {
                AggregationRound::LeafAggregation => job.geometry.leaf_fan_in,
                _ => job.geometry.node_fan_in,
            };
            if inputs.is_empty() {
                return Err(JobError::fatal("aggregation without inputs"));
            }
            for (seq, group) in inputs.chunks(fan_in.into()).enumerate() {
                let input = EncodedInput::Aggregation { inner, proofs: group.to_vec() };
                out.inputs.push((key(job.round, job.circuit_id, job.depth, seq as u32), input.to_bytes()));
            }
            out.counts.push((job.circuit_id, out.inputs.len() as u32));
        }
        AggregationRound::RecursionTip => {
            if inputs.len() != BasicCircuit::ALL.len() || depths.len() != inputs.len() {
                return Err(JobError::fatal(format!("the recursion tip takes {} node proofs", BasicCircuit::ALL.len())));
            }
            let per_type = depths.iter().map(|d| *d as u8).zip(inputs).collect();
            out.inputs.push((key(job.round, CircuitId(0), 0, 0), EncodedInput::Tip(per_type).to_bytes()));
            out.counts.push((CircuitId(0), 1));
        }
        AggregationRound::Scheduler => {
            let [tip] = <[Vec<u8>; 1]>::try_from(inputs).map_err(|_| JobError::fatal("the scheduler takes one tip proof"))?;
            let input = EncodedInput::Scheduler { tip, batch: b, version: job.version };
            out.inputs.push((key(job.round, CircuitId(0), 0, 0), input.to_bytes()));
            out.counts.push((CircuitId(0), 1));
        }
    }
    Ok(out)
}

/// The circuit each of a witness-generation job's `n` inputs is a proof of, in input order; empty
/// for round 0 (its input is the batch file). `depths`: the recursion tip's node depth per type.
/// Errors (not retryable): an unknown circuit type, or depths that do not match the inputs.
pub fn input_circuits(job: &WgJob, n: usize, depths: &[u32]) -> Result<Vec<CircuitKey>, JobError> {
    Ok(match job.round {
        AggregationRound::BasicCircuits => vec![],
        AggregationRound::LeafAggregation | AggregationRound::NodeAggregation => vec![aggregated_circuit(job)?; n],
        AggregationRound::RecursionTip => {
            if depths.len() != n || n != BasicCircuit::ALL.len() {
                return Err(JobError::fatal(format!("the recursion tip takes {} node proofs", BasicCircuit::ALL.len())));
            }
            BasicCircuit::ALL.iter().zip(depths).map(|(t, d)| CircuitKey::Node(*t, *d as u8)).collect()
        }
        AggregationRound::Scheduler => vec![CircuitKey::RecursionTip; n],
    })
}

/// The circuit whose proofs a leaf or node job aggregates: basic proofs for a leaf, leaf proofs
/// at node depth 0, node proofs of depth `d - 1` at depth `d`. Errors (not retryable): an
/// unknown circuit type.
fn aggregated_circuit(job: &WgJob) -> Result<CircuitKey, JobError> {
    let t = BasicCircuit::from_id(job.circuit_id).ok_or_else(|| JobError::fatal(format!("no basic circuit type {}", job.circuit_id)))?;
    Ok(match (job.round, job.depth) {
        (AggregationRound::LeafAggregation, _) => CircuitKey::Basic(t),
        (_, 0) => CircuitKey::Leaf(t),
        (_, d) => CircuitKey::Node(t, d - 1),
    })
}

/// Checks every input proof natively against its circuit's verifier data (`keys[i]` for
/// `inputs[i]`), as the next round must before building on them: a prover that handed in a wrong
/// proof is caught here, not rounds later. `Err` with [`JobError::bad_inputs`] naming those that
/// fail; a retryable error when verifier data cannot be obtained.
pub fn check_input_proofs(store: &SetupStore, keys: &[CircuitKey], inputs: &[Vec<u8>]) -> Result<(), JobError> {
    let mut bad = vec![];
    let mut reasons = vec![];
    for (i, (key, proof)) in keys.iter().zip(inputs).enumerate() {
        if let Err(why) = store.check_proof(*key, proof).map_err(|e| JobError::retry(format!("verifier data of {}: {e:#}", key.name())))? {
            bad.push(i as u32);
            reasons.push(format!("input {i}: {why}"));
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(JobError::bad_inputs(format!("input proofs that do not verify: {}", reasons.join("; ")), bad))
    }
}

/// Witness vector generation: the circuit input's full assignment for circuit `key`, serialized.
/// Errors: a corrupt circuit input or one the circuit does not accept (not retryable); setup data
/// that cannot be obtained (retryable).
pub fn synthesize(setups: &Setups, store: &SetupStore, key: CircuitKey, input: &[u8]) -> Result<Vec<u8>, JobError> {
    let encoded = EncodedInput::from_bytes(input).map_err(|e| JobError::fatal(e.to_string()))?;
    let input = encoded.decode(store).map_err(|e| JobError::fatal(e.to_string()))?;
    let circuit = setups.circuit(store, key)?;
    let partial = witness(&circuit, &input).map_err(|e| JobError::fatal(format!("{e:#}")))?;
    let wv = witness_vector::synthesize(&circuit, partial).map_err(|e| JobError::fatal(format!("{e:#}")))?;
    Ok(wv.to_bytes())
}

/// Proving: a serialized witness vector of circuit `key` to plonky2 proof bytes (checked natively).
/// Errors: a vector for another circuit or one that does not satisfy it (not retryable).
pub fn prove(setups: &Setups, store: &SetupStore, key: CircuitKey, wv: &[u8]) -> Result<Vec<u8>, JobError> {
    let wv = WitnessVector::from_bytes(wv).map_err(|e| JobError::fatal(e.to_string()))?;
    let circuit = setups.circuit(store, key)?;
    let proof = witness_vector::prove(&circuit, wv).map_err(|e| JobError::fatal(format!("{e:#}")))?;
    Ok(proof.to_bytes())
}
