//! `Batches` (for the gateway): submit a batch, watch it, fetch its proof; and a batch's status
//! with its progress per round, which `Admin` shows too.

use std::pin::Pin;
use std::sync::Arc;

use proofmesh_core::{keys, AggregationRound, BatchNumber};
use proofmesh_proto::v1;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::job_state::BatchStatus;
use crate::db::{self, BatchRow, DbError};
use crate::graph::COMPRESSION_ROUND;
use crate::state::Shared;

/// The `Batches` service.
#[derive(Debug, Clone)]
pub struct BatchService {
    shared: Arc<Shared>,
}

impl BatchService {
    /// The services over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        BatchService { shared }
    }
}

/// A database error as a gRPC status.
pub fn internal(e: DbError) -> Status {
    match e {
        DbError::Refused(reason) => Status::failed_precondition(reason),
        DbError::Conflict(reason) => Status::already_exists(reason),
        e => Status::internal(e.to_string()),
    }
}

/// The name of a round number as `BatchStatus` shows it: the aggregation round's own name
/// (`AggregationRound::name`), or `compression` for the stage after round 4.
pub fn round_name(round: u32) -> &'static str {
    u8::try_from(round).ok().and_then(|r| AggregationRound::try_from(r).ok()).map_or("compression", AggregationRound::name)
}

/// A batch's status with per-round progress; `None` if unknown.
pub async fn batch_status(shared: &Shared, number: i64) -> Result<Option<v1::BatchStatus>, DbError> {
    let Some(row) = db::batch(&shared.pool, number).await? else { return Ok(None) };
    let rounds = db::rounds(&shared.pool, number).await?;
    Ok(Some(to_status(row, rounds)))
}

/// A batch row and its rounds as `BatchStatus`.
pub fn to_status(row: BatchRow, rounds: Vec<db::RoundRow>) -> v1::BatchStatus {
    let state = match BatchStatus::parse(&row.status) {
        Some(BatchStatus::Proven) => v1::BatchState::Proven,
        Some(BatchStatus::Failed) => v1::BatchState::Failed,
        _ => v1::BatchState::Proving,
    };
    // Every round is listed, with zero totals before the batch's job graph exists.
    let rounds = (0..=u32::from(COMPRESSION_ROUND))
        .map(|r| {
            let found = rounds.iter().find(|x| x.aggregation_round as u32 == r);
            v1::RoundProgress {
                aggregation_round: r,
                name: round_name(r).into(),
                total: found.map_or(0, |x| x.total as u32),
                succeeded: found.map_or(0, |x| x.succeeded as u32),
                failed: found.map_or(0, |x| x.failed as u32),
                in_progress: found.map_or(0, |x| x.in_progress as u32),
                queued: found.map_or(0, |x| x.queued as u32),
            }
        })
        .collect();
    v1::BatchStatus {
        batch_number: row.batch_number as u32,
        state: state as i32,
        protocol_version: Some(db::proto_version(row.protocol_minor, row.protocol_patch)),
        rounds,
        error: row.error.unwrap_or_default(),
        created_unix_ms: row.created_ms as u64,
        finished_unix_ms: row.finished_ms.unwrap_or(0) as u64,
        compute_secs: row.compute_secs,
    }
}

fn is_final(s: &v1::BatchStatus) -> bool {
    s.state == v1::BatchState::Proven as i32 || s.state == v1::BatchState::Failed as i32
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<v1::BatchStatus, Status>> + Send>>;

#[tonic::async_trait]
impl v1::batches_server::Batches for BatchService {
    async fn submit_batch(
        &self,
        request: Request<v1::SubmitBatchRequest>,
    ) -> Result<Response<v1::SubmitBatchResponse>, Status> {
        let r = request.into_inner();
        let version = r
            .protocol_version
            .and_then(|v| v.to_core())
            .ok_or_else(|| Status::invalid_argument("protocol_version is required (minor and patch < 65536)"))?;
        let batch = BatchNumber(r.batch_number);
        let expected = keys::batch_input(batch);
        if r.input_key != expected {
            return Err(Status::invalid_argument(format!("input_key must be `{expected}` for batch {batch}")));
        }
        let content = match r.content_sha256.len() {
            0 => None,
            32 => Some(r.content_sha256.as_slice()),
            n => return Err(Status::invalid_argument(format!("content_sha256 must be 32 bytes (or empty), not {n}"))),
        };
        let new = db::NewBatch { number: batch, version, input_key: &r.input_key, content_sha256: content, priority: r.priority };
        let created = db::submit_batch(&self.shared.pool, &new, &self.shared.settings.geometry, &self.shared.settings)
            .await
            .map_err(internal)?;
        if created {
            tracing::info!(%batch, %version, "batch submitted");
            self.shared.batch_changed(batch.0.into());
            self.shared.wake_dispatcher();
        }
        Ok(Response::new(v1::SubmitBatchResponse { created }))
    }

    type WatchBatchStream = StatusStream;

    async fn watch_batch(&self, request: Request<v1::WatchBatchRequest>) -> Result<Response<StatusStream>, Status> {
        let number = i64::from(request.into_inner().batch_number);
        // Subscribe before reading, so no change between the read and the subscription is missed.
        let mut events = self.shared.batch_events.subscribe();
        let first = batch_status(&self.shared, number)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("batch {number} was never submitted")))?;
        let shared = self.shared.clone();
        let stream = async_stream(move |tx| async move {
            let mut last = first.clone();
            if tx.send(Ok(first)).await.is_err() || is_final(&last) {
                return;
            }
            loop {
                match events.recv().await {
                    Ok(b) if b != number => continue,
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                }
                let now = match batch_status(&shared, number).await {
                    Ok(Some(s)) => s,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(internal(e))).await;
                        return;
                    }
                };
                if now != last {
                    last = now.clone();
                    if tx.send(Ok(now)).await.is_err() || is_final(&last) {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn get_proof(&self, request: Request<v1::GetProofRequest>) -> Result<Response<v1::GetProofResponse>, Status> {
        let number = i64::from(request.into_inner().batch_number);
        let row = db::batch(&self.shared.pool, number)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("batch {number} was never submitted")))?;
        let Some(key) = row.proof_key.filter(|_| row.status == BatchStatus::Proven.as_str()) else {
            return Err(Status::failed_precondition(format!("batch {number} is {}, not proven", row.status)));
        };
        let proof = self.shared.artifacts.get(&key).await.map_err(|e| match e {
            proofmesh_core::ArtifactError::NotFound { .. } => Status::not_found(format!(
                "batch {number}'s final proof is gone: the artifacts of finished batches are deleted after --artifact-retention-secs"
            )),
            e => Status::unavailable(e.to_string()),
        })?;
        Ok(Response::new(v1::GetProofResponse { proof_key: key, proof }))
    }
}

/// A stream fed by a task: `body` gets the sender.
fn async_stream<F, Fut>(body: F) -> StatusStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<v1::BatchStatus, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
