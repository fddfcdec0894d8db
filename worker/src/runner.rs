//! Every role has one shape: **lease -> execute -> save**. [`run`] takes leases from the lease
//! client, hands each to the role's [`Stage`] on its own task, reports the outcome and frees the
//! slot (one more credit). A stage only reads its inputs, computes (on a blocking thread) and
//! saves; it never talks to the scheduler.
//!
//! Drain (SIGTERM): [`run`] stops taking leases, lets the running ones finish for up to a grace
//! period, hands back the rest (`Failed { handed_back }`: requeued, no attempt counted) and
//! returns once the scheduler has answered every report.

use std::sync::Arc;
use std::time::Duration;

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
    /// Not the job's failure: it could not be placed (the matched prover had no free slot or is
    /// draining). Reported as handed back: queued again, no attempt spent, matched anew.
    pub handed_back: bool,
    /// Not the job's failure either: these inputs (indices into the lease's `input_keys`) are
    /// proofs that do not verify; the scheduler has them proven again (`Failed.bad_inputs`).
    pub bad_inputs: Vec<u32>,
    /// Not the job's failure either: these inputs are missing from the artifact store; the
    /// scheduler has their producers run again (`Failed.lost_inputs`).
    pub lost_inputs: Vec<u32>,
}

impl JobError {
    /// A failure another attempt may not have.
    pub fn retry(message: impl Into<String>) -> Self {
        JobError { message: message.into(), retryable: true, handed_back: false, bad_inputs: vec![], lost_inputs: vec![] }
    }
    /// A failure of the input itself.
    pub fn fatal(message: impl Into<String>) -> Self {
        JobError { message: message.into(), retryable: false, handed_back: false, bad_inputs: vec![], lost_inputs: vec![] }
    }
    /// The job could not be placed where it was sent; it goes back to the queue as it was.
    pub fn hand_back(message: impl Into<String>) -> Self {
        JobError { message: message.into(), retryable: true, handed_back: true, bad_inputs: vec![], lost_inputs: vec![] }
    }
    /// Input proofs `indices` (into the lease's `input_keys`) do not verify: their producers'
    /// fault, not this job's.
    pub fn bad_inputs(message: impl Into<String>, indices: Vec<u32>) -> Self {
        JobError { message: message.into(), retryable: true, handed_back: false, bad_inputs: indices, lost_inputs: vec![] }
    }
}

impl JobError {
    /// Inputs `indices` (into the lease's `input_keys`) are missing from the artifact store:
    /// lost after their jobs succeeded, not this job's fault.
    pub fn lost_inputs(message: impl Into<String>, indices: Vec<u32>) -> Self {
        JobError { message: message.into(), retryable: true, handed_back: false, bad_inputs: vec![], lost_inputs: indices }
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
    /// The stage's name in `proofmesh_job_duration_seconds{stage}`: `witness_generation`,
    /// `witness_vector`, `proving` or `compression`.
    fn name(&self) -> &'static str;

    /// Reads the lease's inputs, computes, saves the outputs.
    async fn handle(&self, lease: &v1::Lease) -> Result<Outcome, JobError>;
}

/// Records one job's wall time in a stage.
pub fn record_duration(stage: &'static str, started: std::time::Instant) {
    metrics::histogram!(proofmesh_core::telemetry::names::JOB_DURATION, "stage" => stage).record(started.elapsed().as_secs_f64());
}

/// How long a drained worker waits for the scheduler to answer its last reports.
pub const REPORT_GRACE: Duration = Duration::from_secs(10);

/// Default of `--stage-timeout-secs`: the scheduler's default maximum lease age
/// (`--max-lease-age-secs`, 1200 s), after which the lease is gone anyway.
pub const DEFAULT_STAGE_TIMEOUT_SECS: f64 = 1200.0;

/// Runs `stage` on every lease until `drain`, then drains: running jobs get `grace` to finish,
/// the rest are handed back. Returns when the scheduler has answered every report (or after
/// [`REPORT_GRACE`] more).
///
/// Every job ends in a report, and its lease is released (heartbeats stop, the credit comes
/// back), whatever the stage does (issue 16 rule 1): a stage that panics, in async code or on
/// its executor thread, is reported `Failed` (retryable) with the panic's message; one still
/// running after `stage_timeout` is given up and reported `Failed` (retryable, "hung"): its
/// future is dropped, though a blocked executor thread cannot be stopped and runs on.
pub async fn run(
    client: Arc<LeaseClient>,
    mut leases: mpsc::Receiver<v1::Lease>,
    stage: Arc<dyn Stage>,
    drain: CancellationToken,
    grace: Duration,
    stage_timeout: Duration,
) {
    loop {
        let lease = tokio::select! {
            l = leases.recv() => match l { Some(l) => l, None => break },
            _ = drain.cancelled() => break,
        };
        let (client, stage) = (client.clone(), stage.clone());
        tokio::spawn(async move {
            let job = lease.job.unwrap_or_default();
            let span = format!(
                "batch {} round {} circuit {} depth {} seq {}",
                job.batch_number, job.aggregation_round, job.circuit_id, job.depth, job.sequence_number
            );
            let started = std::time::Instant::now();
            let outcome = guarded(stage.clone(), lease.clone(), stage_timeout).await;
            record_duration(stage.name(), started);
            match outcome {
                Ok(Outcome::Completed(mut c)) => {
                    tracing::info!(lease = lease.lease_id, "{span}: done in {:.2} CPU s", c.compute_secs);
                    c.lease_id = lease.lease_id.clone();
                    client.completed(c);
                }
                Ok(Outcome::HandedOff) => tracing::debug!(lease = lease.lease_id, "{span}: handed off"),
                Err(e) => {
                    tracing::warn!(lease = lease.lease_id, retryable = e.retryable, "{span}: {e}");
                    client.failed_with(&lease.lease_id, &e);
                }
            }
            client.release(&lease.lease_id);
        });
    }
    client.drain();
    // Leases pushed before the scheduler read `Drain`: give them back untouched (the lease client
    // gives back those that arrive after this).
    leases.close();
    while let Some(lease) = leases.recv().await {
        client.failed(&lease.lease_id, "worker draining: not started", true, true);
        client.release(&lease.lease_id);
    }
    self::drain(&client, grace).await;
}

/// Runs `stage` on `lease` in a task of its own, so that a panic or a hang ends in an error
/// instead of a lease held for ever ([`run`]).
async fn guarded(stage: Arc<dyn Stage>, lease: v1::Lease, limit: Duration) -> Result<Outcome, JobError> {
    let name = stage.name();
    let mut task = tokio::spawn(async move { stage.handle(&lease).await });
    match tokio::time::timeout(limit, &mut task).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) if e.is_panic() => Err(JobError::retry(format!("the {name} stage panicked: {}", panic_text(e.into_panic())))),
        Ok(Err(e)) => Err(JobError::retry(format!("the {name} stage was cancelled: {e}"))),
        Err(_) => {
            task.abort();
            Err(JobError::retry(format!(
                "the {name} stage hung: still running after --stage-timeout-secs ({:.0} s), given up",
                limit.as_secs_f64()
            )))
        }
    }
}

/// A panic's message (`panic!` with a literal or a formatted string), or a placeholder.
fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload.downcast_ref::<&str>().map_or_else(|| "(no message)".to_string(), |s| s.to_string()),
    }
}

/// The end of a drain, for every role: waits up to `grace` for the jobs held to finish, hands
/// back the rest and waits for the scheduler to answer every report. Call after
/// [`LeaseClient::drain`].
pub async fn drain(client: &LeaseClient, grace: Duration) {
    let held = client.held().len();
    tracing::info!(held, "draining: finishing the jobs held for up to {grace:?}");
    if !client.settled(grace).await {
        for lease in client.held() {
            tracing::warn!(lease, "draining: handing back an unfinished job");
            client.failed(&lease, "worker drained before the job finished", true, true);
            client.unhold(&lease);
        }
    }
    if !client.settled(REPORT_GRACE).await {
        tracing::warn!("draining: the scheduler did not answer every report; the leases left expire there");
    }
}

/// Runs an executor on a blocking thread and measures its CPU time ([`crate::cpu::measured`]);
/// a panic becomes a retryable error. Returns the executor's output with its CPU seconds.
pub async fn execute<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, JobError> + Send + 'static,
) -> Result<(T, f64), JobError> {
    let (out, secs) = tokio::task::spawn_blocking(|| crate::cpu::measured(f))
        .await
        .map_err(|e| match e.try_into_panic() {
            Ok(payload) => JobError::retry(format!("executor panicked: {}", panic_text(payload))),
            Err(e) => JobError::retry(format!("executor cancelled: {e}")),
        })?;
    out.map(|o| (o, secs))
}
