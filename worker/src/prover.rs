//! The prover role: serves `Prover.PushWitnessVector`. A push takes one of its slots (else
//! `RESOURCE_EXHAUSTED`; `FAILED_PRECONDITION` while draining), is received whole and checked, and the
//! prover takes the lease over (it heartbeats it from then on, so the WVG may go away) before it
//! acknowledges; then it proves, saves the proof under the job's key and reports the completion
//! on its own `Work` stream.

use std::sync::Arc;

use proofmesh_core::ArtifactStore;
use proofmesh_proto::v1;
use tokio::sync::Semaphore;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::execute::prove;
use crate::lease::LeaseClient;
use crate::runner::{execute, JobError};
use crate::setups::{circuit_key, version_and_geometry, Setups};
use crate::stream::receive;

/// The `Prover` service of one prover worker.
#[derive(Debug, Clone)]
pub struct ProverService {
    /// Free proving slots (the capacity registered with the scheduler).
    pub slots: Arc<Semaphore>,
    /// Where proofs are saved.
    pub artifacts: Arc<dyn ArtifactStore>,
    /// Setup data.
    pub setups: Arc<Setups>,
    /// The prover's own stream to the scheduler, for completions.
    pub client: Arc<LeaseClient>,
    /// Set on SIGTERM: refuse new witness vectors.
    pub draining: CancellationToken,
    /// The largest witness vector accepted, bytes (`--max-witness-vector-mib`).
    pub max_witness_vector_bytes: u64,
    /// TLS on: accept a push only from the WVG identity the scheduler announced for its lease
    /// (`ExpectWitnessVector`), checked from the header, before the bytes are read.
    pub check_pusher: bool,
    /// Testing only (`--fault-wrong-proofs`): flip one byte of every proof before saving it.
    pub wrong_proofs: bool,
}

/// How long a push waits for the scheduler's announcement of its lease (it is sent before the
/// WVG's lease, so it is normally there already).
const ANNOUNCEMENT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[tonic::async_trait]
impl v1::prover_server::Prover for ProverService {
    async fn push_witness_vector(
        &self,
        request: Request<Streaming<v1::WitnessVectorChunk>>,
    ) -> Result<Response<v1::PushReceipt>, Status> {
        if self.draining.is_cancelled() {
            return Err(Status::failed_precondition("prover draining: it takes no new witness vectors"));
        }
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| Status::resource_exhausted("no free proving slot"))?;
        let pusher = proofmesh_proto::peer_identity(&request);
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("an empty witness vector stream"))?;
        if self.check_pusher {
            self.check_pusher(&first, pusher.as_deref()).await?;
        }
        let (header, wv) = receive(tokio_stream::once(Ok(first)).chain(stream), self.max_witness_vector_bytes).await?;
        let received = wv.len() as u64;
        metrics::counter!(proofmesh_core::telemetry::names::WITNESS_VECTOR_BYTES, "direction" => "received").increment(received);
        let lease = header.lease_id.clone();
        self.client.hold(&lease);
        let this = self.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = this.prove_and_save(header, wv).await;
            crate::runner::record_duration("proving", started);
            // Free the slot before reporting: the scheduler may hand it to the next WVG lease as
            // soon as it reads the report.
            drop(permit);
            match result {
                Ok(c) => this.client.completed(c),
                Err(e) => {
                    tracing::warn!(lease, "proving failed: {e}");
                    this.client.failed_with(&lease, &e);
                }
            }
            this.client.unhold(&lease);
        });
        Ok(Response::new(v1::PushReceipt { received_bytes: received }))
    }
}

impl ProverService {
    /// Refuses (`PERMISSION_DENIED`) a push whose sender is not the WVG the scheduler matched
    /// with its lease. `first`: the push's first chunk (its header).
    async fn check_pusher(&self, first: &v1::WitnessVectorChunk, pusher: Option<&proofmesh_proto::PeerIdentity>) -> Result<(), Status> {
        let Some(v1::witness_vector_chunk::Part::Header(header)) = &first.part else {
            return Err(Status::invalid_argument("a witness vector stream starts with its header"));
        };
        let pusher = pusher.map(|p| p.subject()).ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        match self.client.claim_push(&header.lease_id, pusher, ANNOUNCEMENT_WAIT).await {
            Ok(()) => Ok(()),
            Err(Some(expected)) => {
                tracing::warn!(lease = header.lease_id, pusher, expected, "witness vector from another identity than the lease's WVG refused");
                Err(Status::permission_denied(format!("lease {} was not granted to {pusher}", header.lease_id)))
            }
            Err(None) => {
                tracing::warn!(lease = header.lease_id, pusher, "witness vector for a lease the scheduler did not match with this prover refused");
                Err(Status::permission_denied(format!("lease {} was not matched with this prover", header.lease_id)))
            }
        }
    }

    async fn prove_and_save(&self, header: v1::WitnessVectorHeader, wv: Vec<u8>) -> Result<v1::Completed, JobError> {
        let job = header.job.unwrap_or_default();
        let (version, geometry) = version_and_geometry(header.protocol_version.as_ref(), header.geometry.as_ref())?;
        let key = circuit_key(&job)?;
        if header.output_key.is_empty() {
            return Err(JobError::fatal("witness vector without an output key"));
        }
        let setups = self.setups.clone();
        let (mut proof, secs) = execute(move || prove(&setups, &*setups.store(version, geometry)?, key, &wv)).await?;
        if self.wrong_proofs {
            let i = proof.len() / 2;
            proof[i] ^= 0x01;
            tracing::warn!(lease = header.lease_id, "fault injection: handing in a wrong proof");
        }
        let bytes = proof.len() as u64;
        self.artifacts.put(&header.output_key, proof).await.map_err(|e| JobError::retry(e.to_string()))?;
        tracing::info!(
            lease = header.lease_id,
            "batch {} round {} circuit {} depth {} seq {}: proven in {secs:.2} CPU s",
            job.batch_number,
            job.aggregation_round,
            job.circuit_id,
            job.depth,
            job.sequence_number
        );
        Ok(v1::Completed {
            lease_id: header.lease_id,
            circuits: vec![],
            compute_secs: header.wvg_compute_secs + secs,
            output_bytes: bytes,
            ..Default::default()
        })
    }
}
