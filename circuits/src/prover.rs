//! Proving jobs, and the whole proof tree of a batch in one process.
//!
//! A job is `(circuit, input)`; [`witness`] turns its input into the circuit's partial witness,
//! [`crate::witness_vector::synthesize`] into a witness vector, [`crate::witness_vector::prove`]
//! into a proof. [`prove_batch`] runs every job of every round in order (the cluster runs the same
//! jobs as separate leases).

use std::time::Instant;

use plonky2::iop::witness::PartialWitness;
use proofmesh_core::{AggregationPlan, BatchNumber, ProtocolVersion};

use crate::basic::{chunk_inputs, BasicCircuit, BasicInput};
use crate::batch::Batch;
use crate::final_proof::FinalProof;
use crate::setup::{Circuit, CircuitKey, SetupStore, Targets};
use crate::state::{replay, PublicData};
use crate::witness_vector::{prove, synthesize, Proof};
use crate::F;

/// What a job proves over.
pub enum JobInput {
    /// Round 0: a chunk of the batch.
    Basic(BasicInput),
    /// Rounds 1 and 2: the proofs of one group, in chain order.
    Aggregation(Vec<Proof>),
    /// Round 3: per basic type (circuit-id order), the node depth and the top node proof.
    Tip(Vec<(usize, Proof)>),
    /// Round 4: the tip proof and the batch it is for.
    Scheduler {
        /// The recursion tip's proof.
        tip: Proof,
        /// The batch's number.
        batch: BatchNumber,
        /// Its protocol version.
        version: ProtocolVersion,
    },
    /// Compression: the scheduler proof.
    Compression(Proof),
}

/// The partial witness of `input` for `circuit`. Errors if the input is for another kind of circuit.
pub fn witness(circuit: &Circuit, input: &JobInput) -> anyhow::Result<PartialWitness<F>> {
    match (&circuit.targets, input) {
        (Targets::Basic(t), JobInput::Basic(i)) => t.fill(i),
        (Targets::Aggregation(t), JobInput::Aggregation(p)) => t.fill(p),
        (Targets::Tip(t), JobInput::Tip(p)) => t.fill(p),
        (Targets::Scheduler(t), JobInput::Scheduler { tip, batch, version }) => t.fill(tip, *batch, *version),
        (Targets::Compression(t), JobInput::Compression(p)) => t.fill(p),
        _ => anyhow::bail!("input of the wrong kind for circuit {}", circuit.key.name()),
    }
}

/// Timings of one job.
#[derive(Debug, Clone)]
pub struct JobReport {
    /// The circuit proven.
    pub key: CircuitKey,
    /// log2 of its rows.
    pub degree_bits: usize,
    /// Witness vector generation, seconds.
    pub witness_secs: f64,
    /// Proving (including the native check), seconds.
    pub prove_secs: f64,
    /// Serialized proof size, bytes.
    pub proof_bytes: usize,
    /// Peak resident memory of the process during the job, bytes (Linux; `None` elsewhere).
    pub peak_rss_bytes: Option<u64>,
    /// Resident memory when the job started (its circuit's setup data loaded), bytes: the job's
    /// own peak is `peak_rss_bytes - rss_before_bytes`.
    pub rss_before_bytes: Option<u64>,
}

/// Resets the kernel's peak-RSS mark of this process (`/proc/self/clear_refs`, Linux >= 4.0),
/// after handing the allocator's free memory back to the kernel (glibc `malloc_trim`), so the
/// RSS at a job's start is what is live then, not what earlier, larger jobs left cached.
fn reset_peak_rss() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A `/proc/self/status` memory field (`VmHWM`, `VmRSS`) of this process, bytes.
fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs one job: witness, witness vector, proof.
pub fn run_job(circuit: &Circuit, input: &JobInput) -> anyhow::Result<(Proof, JobReport)> {
    reset_peak_rss();
    let rss_before_bytes = status_bytes("VmRSS:");
    let start = Instant::now();
    let wv = synthesize(circuit, witness(circuit, input)?)?;
    let witness_secs = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let proof = prove(circuit, wv)?;
    let report = JobReport {
        key: circuit.key,
        degree_bits: circuit.degree_bits(),
        witness_secs,
        prove_secs: start.elapsed().as_secs_f64(),
        proof_bytes: proof.to_bytes().len(),
        peak_rss_bytes: status_bytes("VmHWM:"),
        rss_before_bytes,
    };
    Ok((proof, report))
}

/// One round's summary, as `prove` prints it.
#[derive(Debug, Clone)]
pub struct RoundReport {
    /// `basic`, `leaf`, `node d0`, ..., `recursion_tip`, `scheduler`, `compression`.
    pub label: String,
    /// Circuits proven in the round.
    pub circuits: usize,
    /// Wall time, seconds (setup loading included).
    pub secs: f64,
}

/// The aggregation plan of each basic type for `batch`.
pub fn plans(store: &SetupStore, batch: &Batch) -> anyhow::Result<Vec<(BasicCircuit, AggregationPlan)>> {
    let g = store.geometry();
    BasicCircuit::ALL
        .iter()
        .map(|t| Ok((*t, g.aggregation_plan(t.circuits(g, batch.transactions.len()))?)))
        .collect()
}

/// Proves `batch` through every round and compression in this process. `on_job` sees each job's
/// report, `on_round` each round's. Errors: a batch that does not replay (bad witness, a state root
/// that does not chain, a transaction breaking the rules), a geometry mismatch, or too many circuits.
pub fn prove_batch(
    store: &SetupStore,
    batch: &Batch,
    on_job: &mut dyn FnMut(&JobReport),
    on_round: &mut dyn FnMut(&RoundReport),
) -> anyhow::Result<FinalProof> {
    let g = *store.geometry();
    anyhow::ensure!(
        batch.state_tree_depth == g.state_tree_depth,
        "batch {} has a state tree of depth {}, the geometry expects {}",
        batch.number,
        batch.state_tree_depth,
        g.state_tree_depth
    );
    let replay = replay(batch).map_err(|e| anyhow::anyhow!("batch {}: {e}", batch.number))?;
    let plans = plans(store, batch)?;

    let mut round = |label: String, jobs: Vec<(CircuitKey, JobInput)>, on_job: &mut dyn FnMut(&JobReport)| -> anyhow::Result<Vec<Proof>> {
        let start = Instant::now();
        let n = jobs.len();
        let mut proofs = Vec::with_capacity(n);
        for (key, input) in jobs {
            let circuit = store.circuit(key)?;
            let (proof, report) = run_job(&circuit, &input)?;
            on_job(&report);
            proofs.push(proof);
        }
        store.release();
        on_round(&RoundReport { label, circuits: n, secs: start.elapsed().as_secs_f64() });
        Ok(proofs)
    };

    // Round 0 and 1, per type; `level[t]` holds the proofs of type t at the current level.
    let mut jobs = vec![];
    for (t, _) in &plans {
        for input in chunk_inputs(batch, &replay, &g, *t) {
            jobs.push((CircuitKey::Basic(*t), JobInput::Basic(input)));
        }
    }
    let basic = round("basic".into(), jobs, on_job)?;
    let mut level = split_by_type(basic, &plans.iter().map(|(_, p)| p.basic).collect::<Vec<_>>());

    let group = |proofs: &[Proof], fan_in: u8| -> Vec<Vec<Proof>> {
        proofs.chunks(fan_in.into()).map(|c| c.to_vec()).collect()
    };
    let mut jobs = vec![];
    for ((t, _), proofs) in plans.iter().zip(&level) {
        for g_ in group(proofs, g.leaf_fan_in) {
            jobs.push((CircuitKey::Leaf(*t), JobInput::Aggregation(g_)));
        }
    }
    let leaves = round("leaf".into(), jobs, on_job)?;
    level = split_by_type(leaves, &plans.iter().map(|(_, p)| p.leaves).collect::<Vec<_>>());

    // Round 2: node levels until one proof per type; a type that is done waits at its depth.
    let mut top_depth = vec![0usize; plans.len()];
    let max_levels = plans.iter().map(|(_, p)| p.nodes.len()).max().unwrap_or(1);
    for depth in 0..max_levels {
        let mut jobs = vec![];
        let mut counts = vec![];
        for (i, ((t, plan), proofs)) in plans.iter().zip(&level).enumerate() {
            if depth < plan.nodes.len() {
                let groups = group(proofs, g.node_fan_in);
                counts.push(groups.len());
                top_depth[i] = depth;
                for g_ in groups {
                    jobs.push((CircuitKey::Node(*t, depth as u8), JobInput::Aggregation(g_)));
                }
            } else {
                counts.push(0);
            }
        }
        let nodes = round(format!("node d{depth}"), jobs, on_job)?;
        let mut nodes = split_by_type(nodes, &counts).into_iter();
        for (i, (_, plan)) in plans.iter().enumerate() {
            let next = nodes.next().expect("one entry per type");
            if depth < plan.nodes.len() {
                level[i] = next;
            }
        }
    }

    let per_type = level.into_iter().zip(top_depth).map(|(mut p, d)| (d, p.remove(0))).collect();
    let tip = round("recursion_tip".into(), vec![(CircuitKey::RecursionTip, JobInput::Tip(per_type))], on_job)?;
    let input = JobInput::Scheduler { tip: tip.into_iter().next().expect("one"), batch: batch.number, version: batch.protocol_version };
    let scheduler = round("scheduler".into(), vec![(CircuitKey::Scheduler, input)], on_job)?;
    let scheduler = scheduler.into_iter().next().expect("one");
    let expected = PublicData::from_replay(batch, &replay).to_public_inputs();
    anyhow::ensure!(scheduler.public_inputs == expected, "scheduler proof's public inputs differ from the batch's public data");
    let compressed = round("compression".into(), vec![(CircuitKey::Compression, JobInput::Compression(scheduler))], on_job)?;
    FinalProof::new(store, batch.protocol_version, compressed.into_iter().next().expect("one"))
}

/// Splits `proofs` into consecutive runs of `counts[i]`.
fn split_by_type(proofs: Vec<Proof>, counts: &[usize]) -> Vec<Vec<Proof>> {
    let mut it = proofs.into_iter();
    counts.iter().map(|n| it.by_ref().take(*n).collect()).collect()
}
