//! Every role has one shape: **lease -> execute -> save**. [`run`] takes leases from the lease
//! client, hands each to the role's [`Stage`] on its own task, reports the outcome and frees the
//! slot (one more credit). A stage only reads its inputs, computes (on a blocking thread) and
//! saves; it never talks to the scheduler.

use std::sync::Arc;

use proofmesh_proto::v1;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::lease::LeaseClient;

/// Why a job failed, and whether another attempt can help.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    /// What went wrong, with the job's context.
    pub message: String,
    /// False for bad input (a batch that does not replay, a corrupt artifact): the job and its
    /// batch fail at once. True for the rest (an unreachable prover, a full disk).
    pub retryable: bool,
}

impl JobError {
    /// A failure another attempt may not have.
    pub fn retry(message: impl Into<String>) -> Self {
        JobError { message: message.into(), retryable: true }
    }
    /// A failure of the input itself.
    pub fn fatal(message: impl Into<String>) -> Self {
        JobError { message: message.into(), retryable: false }
    }
}

/// What a stage did with a lease.
#[derive(Debug)]
pub enum Outcome {
    /// Done: report `Completed` with these fields (the lease id is filled in).
    Completed(v1::Completed),
    /// Passed on (a WVG streamed the witness vector to a prover, which reports).
    HandedOff,
}

/// One role's work on one lease.
#[async_trait::async_trait]
pub trait Stage: Send + Sync + 'static {
    /// Reads the lease's inputs, computes, saves the outputs.
    async fn handle(&self, lease: &v1::Lease) -> Result<Outcome, JobError>;
}

/// Runs `stage` on every lease until `cancel`.
pub async fn run(client: Arc<LeaseClient>, mut leases: mpsc::Receiver<v1::Lease>, stage: Arc<dyn Stage>, cancel: CancellationToken) {
    loop {
        let lease = tokio::select! {
            l = leases.recv() => match l { Some(l) => l, None => return },
            _ = cancel.cancelled() => return,
        };
        let (client, stage, cancel) = (client.clone(), stage.clone(), cancel.clone());
        tokio::spawn(async move {
            let job = lease.job.unwrap_or_default();
            let span = format!(
                "batch {} round {} circuit {} depth {} seq {}",
                job.batch_number, job.aggregation_round, job.circuit_id, job.depth, job.sequence_number
            );
            match stage.handle(&lease).await {
                Ok(Outcome::Completed(mut c)) => {
                    tracing::info!(lease = lease.lease_id, "{span}: done in {:.2} CPU s", c.compute_secs);
                    c.lease_id = lease.lease_id.clone();
                    client.completed(c, &cancel).await;
                }
                Ok(Outcome::HandedOff) => tracing::debug!(lease = lease.lease_id, "{span}: handed off"),
                Err(e) => {
                    tracing::warn!(lease = lease.lease_id, retryable = e.retryable, "{span}: {e}");
                    client.failed(&lease.lease_id, &e.message, e.retryable, &cancel).await;
                }
            }
            client.release();
        });
    }
}

/// Runs an executor on a blocking thread and measures its CPU time ([`crate::cpu::measured`]);
/// a panic becomes a retryable error. Returns the executor's output with its CPU seconds.
pub async fn execute<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, JobError> + Send + 'static,
) -> Result<(T, f64), JobError> {
    let (out, secs) = tokio::task::spawn_blocking(|| crate::cpu::measured(f))
        .await
        .map_err(|e| JobError::retry(format!("executor panicked: {e}")))?;
    out.map(|o| (o, secs))
}
