//! The compression stage: the scheduler proof of a batch in, the final proof out
//! (`proofmesh_circuits::final_proof` format), checked against the batch file's public data
//! (issue 16 rule 3), then saved under the batch's final-proof key.

use std::sync::Arc;

use proofmesh_circuits::final_proof::{verify_in, FinalProof};
use proofmesh_circuits::plonky2::plonk::proof::ProofWithPublicInputs;
use proofmesh_circuits::prover::{run_job, JobInput};
use proofmesh_circuits::setup::{CircuitKey, SetupStore};
use proofmesh_core::{keys, ArtifactStore, BatchNumber, ProtocolVersion};
use proofmesh_proto::v1;
use proofmesh_worker::execute::check_input_proofs;
use proofmesh_worker::runner::{execute, JobError, Outcome, Stage};
use proofmesh_worker::setups::{version_and_geometry, Setups};
use proofmesh_worker::wg::read_all;

/// Compresses a scheduler proof into the final proof's bytes. Errors: bytes that are not a
/// scheduler proof of this version and geometry (not retryable).
pub fn compress(setups: &Setups, store: &SetupStore, version: ProtocolVersion, scheduler_proof: Vec<u8>) -> Result<Vec<u8>, JobError> {
    let vd = store.verifier(CircuitKey::Scheduler).map_err(|e| JobError::retry(format!("{e:#}")))?;
    let proof = ProofWithPublicInputs::from_bytes(scheduler_proof, &vd.common)
        .map_err(|_| JobError::fatal("the input is not a scheduler proof of this protocol version and geometry"))?;
    let circuit = setups.circuit(store, CircuitKey::Compression)?;
    let (compressed, _) = run_job(&circuit, &JobInput::Compression(proof)).map_err(|e| JobError::fatal(format!("{e:#}")))?;
    let final_proof = FinalProof::new(store, version, compressed).map_err(|e| JobError::fatal(format!("{e:#}")))?;
    Ok(final_proof.to_bytes())
}

/// Verifies `final_proof` (a final proof file) against `batch` (the batch file) as the chain's
/// verifier would ([`verify_in`]): its public inputs must be the ones replaying the batch gives,
/// and the proof must verify. Errors: retryable, naming why (a proof of other public data means
/// an input of the batch's rounds was not this batch's, or the compressor misbehaved; the
/// job's attempts bound how often that is tried again, and the batch is never marked proven
/// with it).
pub fn check_against_batch(store: &SetupStore, version: ProtocolVersion, final_proof: &[u8], batch: &[u8]) -> Result<(), JobError> {
    verify_in(store, version, final_proof, batch)
        .map(|_| ())
        .map_err(|e| JobError::retry(format!("the final proof does not verify against its batch: {e}")))
}

/// The compressor's stage.
#[derive(Debug)]
pub struct Compressor {
    /// Where the scheduler proof is read and the final proof written.
    pub artifacts: Arc<dyn ArtifactStore>,
    /// Setup data.
    pub setups: Arc<Setups>,
}

#[async_trait::async_trait]
impl Stage for Compressor {
    fn name(&self) -> &'static str {
        "compression"
    }

    async fn handle(&self, lease: &v1::Lease) -> Result<Outcome, JobError> {
        let (version, geometry) = version_and_geometry(lease.protocol_version.as_ref(), lease.geometry.as_ref())?;
        if lease.output_key.is_empty() {
            return Err(JobError::fatal("compression lease without an output key"));
        }
        let batch_number = lease.job.as_ref().map(|j| BatchNumber(j.batch_number)).ok_or_else(|| JobError::fatal("compression lease without a job"))?;
        let input = read_all(self.artifacts.as_ref(), &lease.input_keys).await?.pop().ok_or_else(|| JobError::fatal("no scheduler proof"))?;
        let batch = self.artifacts.get(&keys::batch_input(batch_number)).await.map_err(|e| JobError::retry(format!("reading the batch file to check the final proof against: {e}")))?;
        let setups = self.setups.clone();
        let (bytes, secs) = execute(move || {
            let store = setups.store(version, geometry)?;
            // The scheduler proof is checked like every round's inputs: a wrong one is proven again.
            check_input_proofs(&store, &[CircuitKey::Scheduler], std::slice::from_ref(&input))?;
            let bytes = compress(&setups, &store, version, input)?;
            check_against_batch(&store, version, &bytes, &batch)?;
            Ok(bytes)
        })
        .await?;
        let size = bytes.len() as u64;
        self.artifacts.put(&lease.output_key, bytes).await.map_err(|e| JobError::retry(e.to_string()))?;
        Ok(Outcome::Completed(v1::Completed {
            lease_id: String::new(),
            circuits: vec![],
            compute_secs: secs,
            output_bytes: size,
            verified_against_batch: true,
        }))
    }
}
