//! The WVG role: synthesizes a proving job's witness vector and streams it to the prover the
//! scheduler matched with the lease (same host first, then same zone). The prover reports the
//! job; the WVG's part ends with the prover's receipt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use proofmesh_core::ArtifactStore;
use proofmesh_proto::v1;
use tonic::transport::Channel;

use crate::execute::synthesize;
use crate::runner::{execute, JobError, Outcome, Stage};
use crate::setups::{circuit_key, version_and_geometry, Setups};
use crate::stream::{prover_channel, push};
use crate::wg::read_all;

/// The WVG stage.
#[derive(Debug)]
pub struct WitnessVectorGenerator {
    /// Where circuit inputs are read.
    pub artifacts: Arc<dyn ArtifactStore>,
    /// Setup data.
    pub setups: Arc<Setups>,
    /// One channel per prover endpoint.
    pub channels: Mutex<HashMap<String, Channel>>,
    /// TLS to provers.
    pub tls: proofmesh_proto::TlsArgs,
    /// The name provers' certificates are checked against (`--prover-tls-name`); `None`: the
    /// host of each prover's endpoint.
    pub prover_tls_name: Option<String>,
}

impl WitnessVectorGenerator {
    fn channel(&self, endpoint: &str) -> Result<Channel, JobError> {
        let mut channels = self.channels.lock().expect("poisoned");
        if let Some(c) = channels.get(endpoint) {
            return Ok(c.clone());
        }
        let c = prover_channel(endpoint, &self.tls, self.prover_tls_name.as_deref()).map_err(|e| JobError::retry(format!("prover endpoint {endpoint}: {e}")))?;
        channels.insert(endpoint.to_string(), c.clone());
        Ok(c)
    }
}

#[async_trait::async_trait]
impl Stage for WitnessVectorGenerator {
    fn name(&self) -> &'static str {
        "witness_vector"
    }

    async fn handle(&self, lease: &v1::Lease) -> Result<Outcome, JobError> {
        if lease.prover_endpoint.is_empty() {
            return Err(JobError::retry("WVG lease without a prover"));
        }
        let job = lease.job.unwrap_or_default();
        let (version, geometry) = version_and_geometry(lease.protocol_version.as_ref(), lease.geometry.as_ref())?;
        let key = circuit_key(&job)?;
        let input = read_all(self.artifacts.as_ref(), &lease.input_keys).await?.pop().ok_or_else(|| JobError::fatal("no circuit input"))?;
        let setups = self.setups.clone();
        let (wv, secs) = execute(move || synthesize(&setups, &*setups.store(version, geometry)?, key, &input)).await?;
        let header = v1::WitnessVectorHeader {
            lease_id: lease.lease_id.clone(),
            job: Some(job),
            protocol_version: lease.protocol_version,
            geometry: lease.geometry,
            size: 0,
            crc32: 0,
            output_key: lease.output_key.clone(),
            wvg_compute_secs: secs,
        };
        let channel = self.channel(&lease.prover_endpoint)?;
        let bytes = wv.len() as u64;
        push(channel, header, wv).await.map_err(|s| {
            let message = format!("streaming to prover {}: {}", lease.prover_endpoint, s.message());
            match s.code() {
                // The prover is draining (the scheduler matches no more WVGs with it), or all its
                // slots are busy (the scheduler's count had drifted: its next heartbeat corrects
                // it, issue 16 rule 6): not the job's failure; it is matched again without
                // spending an attempt. Anything else (unreachable, stream dropped) spends one, so
                // a misconfigured endpoint fails its batches with this message instead of looping.
                tonic::Code::FailedPrecondition | tonic::Code::ResourceExhausted => JobError::hand_back(message),
                _ => JobError::retry(message),
            }
        })?;
        metrics::counter!(proofmesh_core::telemetry::names::WITNESS_VECTOR_BYTES, "direction" => "sent").increment(bytes);
        Ok(Outcome::HandedOff)
    }
}
