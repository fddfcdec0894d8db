//! The witness-generator role: reads a job's inputs, builds the circuit inputs of its round,
//! saves each under its key, and reports how many circuits of each circuit id it made.

use std::sync::Arc;

use proofmesh_core::{AggregationRound, ArtifactStore, BatchNumber, CircuitId};
use proofmesh_proto::v1;

use crate::execute::{check_input_proofs, input_circuits, witness_generation, WgJob};
use crate::runner::{execute, JobError, Outcome, Stage};
use crate::setups::{version_and_geometry, Setups};

/// The witness-generation stage. Before building on proofs (rounds 1 to 4), it checks each one
/// natively against its circuit's verifier data (from `setups`: small files, no prover data).
#[derive(Debug)]
pub struct WitnessGenerator {
    /// Where inputs are read and circuit inputs written.
    pub artifacts: Arc<dyn ArtifactStore>,
    /// Setup data, for the input proofs' verifier data.
    pub setups: Arc<Setups>,
}

/// Reads every key in order. Errors: [`JobError::lost_inputs`] naming every key the store does
/// not have, or holds damaged (its checksum does not match: [`proofmesh_core::ArtifactError::Corrupt`]),
/// lost after its job succeeded: the scheduler has it made again; any other store error is
/// retryable (a hiccup), not the input's fault.
pub async fn read_all(artifacts: &dyn ArtifactStore, keys: &[String]) -> Result<Vec<Vec<u8>>, JobError> {
    let mut out = Vec::with_capacity(keys.len());
    let mut lost = vec![];
    for (i, k) in keys.iter().enumerate() {
        match artifacts.get(k).await {
            Ok(bytes) => out.push(bytes),
            // Every input is read, so one report names all that are gone.
            Err(proofmesh_core::ArtifactError::NotFound { key }) => lost.push((i as u32, key)),
            // Damaged in the store (its checksum): as good as lost, and no prover's fault.
            Err(e @ proofmesh_core::ArtifactError::Corrupt { .. }) => lost.push((i as u32, e.to_string())),
            Err(e) => return Err(JobError::retry(e.to_string())),
        }
    }
    if !lost.is_empty() {
        let keys: Vec<&str> = lost.iter().map(|(_, k)| k.as_str()).collect();
        let message = format!("{} input(s) missing from the artifact store or damaged there: {}", lost.len(), keys.join(", "));
        return Err(JobError::lost_inputs(message, lost.into_iter().map(|(i, _)| i).collect()));
    }
    Ok(out)
}

#[async_trait::async_trait]
impl Stage for WitnessGenerator {
    fn name(&self) -> &'static str {
        "witness_generation"
    }

    async fn handle(&self, lease: &v1::Lease) -> Result<Outcome, JobError> {
        let job = lease.job.unwrap_or_default();
        let (version, geometry) = version_and_geometry(lease.protocol_version.as_ref(), lease.geometry.as_ref())?;
        let round = u8::try_from(job.aggregation_round)
            .ok()
            .and_then(|r| AggregationRound::try_from(r).ok())
            .ok_or_else(|| JobError::fatal(format!("no aggregation round {}", job.aggregation_round)))?;
        let wg = WgJob {
            batch: BatchNumber(job.batch_number),
            version,
            geometry,
            round,
            circuit_id: CircuitId(job.circuit_id as u8),
            depth: job.depth as u8,
        };
        let inputs = read_all(self.artifacts.as_ref(), &lease.input_keys).await?;
        let depths = lease.input_depths.clone();
        let setups = self.setups.clone();
        let (circuits, secs) = execute(move || {
            let keys = input_circuits(&wg, inputs.len(), &depths)?;
            if !keys.is_empty() {
                check_input_proofs(&*setups.store(version, geometry)?, &keys, &inputs)?;
            }
            witness_generation(wg, inputs, &depths)
        })
        .await?;
        let mut bytes = 0u64;
        for (key, data) in circuits.inputs {
            bytes += data.len() as u64;
            self.artifacts.put(&key, data).await.map_err(|e| JobError::retry(e.to_string()))?;
        }
        Ok(Outcome::Completed(v1::Completed {
            lease_id: String::new(),
            circuits: circuits
                .counts
                .into_iter()
                .map(|(id, count)| v1::CircuitCount { circuit_id: id.0.into(), count })
                .collect(),
            compute_secs: secs,
            output_bytes: bytes,
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proofmesh_core::LocalStore;

    #[tokio::test]
    async fn inputs_missing_from_the_store_are_reported_lost_every_one_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        store.put("a", b"proof a".to_vec()).await.unwrap();
        store.put("damaged-3", b"proof b".to_vec()).await.unwrap();
        let file = dir.path().join("damaged-3");
        let mut bytes = std::fs::read(&file).unwrap();
        *bytes.last_mut().unwrap() ^= 0x20;
        std::fs::write(&file, bytes).unwrap();
        let keys = ["gone-0", "a", "gone-2", "damaged-3"].map(String::from);
        let e = read_all(&store, &keys).await.unwrap_err();
        assert_eq!(e.lost_inputs, vec![0, 2, 3]);
        assert!(e.message.contains("damaged-3") && e.message.contains("corrupted"), "{}", e.message);
        assert!(e.bad_inputs.is_empty() && e.retryable);
        assert!(e.message.contains("gone-0") && e.message.contains("gone-2"), "{}", e.message);
        assert_eq!(read_all(&store, &keys[1..2]).await.unwrap(), vec![b"proof a".to_vec()]);
    }
}
