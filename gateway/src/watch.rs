//! One batch from its parsed file to its result in the outbox: store the file, submit it, watch
//! it until the scheduler says proven or failed, fetch the proof and write the outbox files.
//!
//! Every step waits out a scheduler that is away (restarts lose nothing: the scheduler owns the
//! batch's state, and `SubmitBatch` is idempotent), and stops when the gateway shuts down.

use std::sync::Arc;

use proofmesh_core::{keys, ArtifactError, ArtifactStore, BatchNumber, ProtocolVersion};
use proofmesh_proto::v1::batches_client::BatchesClient;
use proofmesh_proto::v1::{BatchState, BatchStatus, GetProofRequest, SubmitBatchRequest, WatchBatchRequest};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::scheduler::backoff;
use crate::inbox::{BatchFile, Inbox, Incoming};
use crate::outbox::Outbox;
use crate::progress::{BatchBar, Progress};
use crate::scheduler::{describe, is_transient, retrying, Stop};
use crate::summary::{wall_secs, Outcome, ProofSummary, Report, RoundCount};

/// What every batch task shares. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Gateway {
    /// The scheduler's `Batches` service.
    pub client: BatchesClient<Channel>,
    /// Where batch files are stored for the cluster to read.
    pub store: Arc<dyn ArtifactStore>,
    /// Where taken files are moved.
    pub inbox: Inbox,
    /// Where results are written.
    pub outbox: Outbox,
    /// The progress bars.
    pub progress: Progress,
    /// Cancelled on shutdown.
    pub shutdown: CancellationToken,
}

/// Takes one parsed batch file to its end and reports how it ended. Every outcome is logged and,
/// except an interruption, leaves a result in the outbox (`.proof` + `.json`, or `.error`).
pub(crate) async fn prove(gw: Gateway, incoming: Incoming) -> Report {
    let Incoming { file, number, protocol_version, transactions, bytes } = incoming;

    let input_key = match store_input(gw.store.as_ref(), number, bytes).await {
        Ok(key) => key,
        Err(reason) => return gw.inbox.refuse(&file, Some(number), reason, &gw.outbox).await,
    };
    let request = SubmitBatchRequest {
        batch_number: number.0,
        protocol_version: Some(protocol_version.into()),
        input_key,
        priority: 0,
    };
    let submitted = retrying(&gw.shutdown, number, "SubmitBatch", || {
        let mut client = gw.client.clone();
        let request = request.clone();
        async move { client.submit_batch(request).await }
    })
    .await;
    match submitted {
        Ok(response) if response.get_ref().created => tracing::info!(%number, file = %file.name, "submitted"),
        Ok(_) => tracing::info!(%number, file = %file.name, "already submitted: watching the existing batch"),
        Err(Stop::Shutdown) => return Report::early(&file.name, Some(number.0), Outcome::Interrupted),
        Err(Stop::Refused(reason)) => return gw.inbox.refuse(&file, Some(number), reason, &gw.outbox).await,
    }
    if let Err(e) = gw.inbox.mark_submitted(&file).await {
        tracing::warn!(%number, file = %file.name, "cannot move it to submitted/: {e}");
    }

    let bar = gw.progress.batch(&file.name, number.0);
    let report = match watch(&gw, number, &bar).await {
        Ok(status) if status.state() == BatchState::Proven => {
            deliver(&gw, &file, number, protocol_version, transactions, &status).await
        }
        Ok(status) => {
            let reason = if status.error.is_empty() {
                "failed (the scheduler gave no reason)".into()
            } else {
                status.error.clone()
            };
            fail(&gw, &file, number, Some(&status), reason).await
        }
        Err(Stop::Shutdown) => Report::early(&file.name, Some(number.0), Outcome::Interrupted),
        Err(Stop::Refused(reason)) => fail(&gw, &file, number, None, reason).await,
    };
    bar.finish(report.outcome.word());
    report
}

/// Stores the batch file under [`keys::batch_input`] and returns the key. A batch already
/// stored with the same bytes (a resubmission) is left as it is; one stored with other bytes is
/// refused, since proving it would hand back another file's proof under this file's name.
async fn store_input(store: &dyn ArtifactStore, number: BatchNumber, bytes: Vec<u8>) -> Result<String, String> {
    let key = keys::batch_input(number);
    match store.get(&key).await {
        Ok(existing) if existing == bytes => return Ok(key),
        Ok(_) => {
            return Err(format!(
                "batch {number} is already stored at `{key}` with other contents: batch numbers must be unique"
            ))
        }
        Err(ArtifactError::NotFound { .. }) => {}
        Err(e) => return Err(format!("cannot store the batch: {e}")),
    }
    store.put(&key, bytes).await.map_err(|e| format!("cannot store the batch: {e}"))?;
    Ok(key)
}

/// Follows `WatchBatch` until the batch is proven or failed and returns that last status. A
/// stream that breaks or ends early is opened again with backoff.
async fn watch(gw: &Gateway, number: BatchNumber, bar: &BatchBar) -> Result<BatchStatus, Stop> {
    let mut backoff = backoff();
    loop {
        let mut stream = retrying(&gw.shutdown, number, "WatchBatch", || {
            let mut client = gw.client.clone();
            async move { client.watch_batch(WatchBatchRequest { batch_number: number.0 }).await }
        })
        .await?
        .into_inner();
        loop {
            let next = tokio::select! {
                _ = gw.shutdown.cancelled() => return Err(Stop::Shutdown),
                next = stream.message() => next,
            };
            match next {
                Ok(Some(status)) => {
                    backoff.reset();
                    bar.update(&status);
                    if matches!(status.state(), BatchState::Proven | BatchState::Failed) {
                        return Ok(status);
                    }
                }
                Ok(None) => {
                    tracing::warn!(%number, "the WatchBatch stream ended before the batch did");
                    break;
                }
                Err(s) if is_transient(&s) => {
                    tracing::warn!(%number, "the WatchBatch stream broke: {}", describe(&s));
                    break;
                }
                Err(s) => return Err(Stop::Refused(format!("WatchBatch: {}", describe(&s)))),
            }
        }
        tracing::info!(%number, "watching it again in {:?}", backoff.delay());
        if !backoff.wait(&gw.shutdown).await {
            return Err(Stop::Shutdown);
        }
    }
}

/// The batch is proven: fetches the proof, writes `<stem>.proof` then `<stem>.json`.
async fn deliver(
    gw: &Gateway,
    file: &BatchFile,
    number: BatchNumber,
    version: ProtocolVersion,
    transactions: usize,
    status: &BatchStatus,
) -> Report {
    let response = retrying(&gw.shutdown, number, "GetProof", || {
        let mut client = gw.client.clone();
        async move { client.get_proof(GetProofRequest { batch_number: number.0 }).await }
    })
    .await;
    let proof = match response {
        Ok(response) => response.into_inner(),
        Err(Stop::Shutdown) => return Report::early(&file.name, Some(number.0), Outcome::Interrupted),
        Err(Stop::Refused(reason)) => return fail(gw, file, number, Some(status), reason).await,
    };
    // The proof comes inline; a scheduler that only names its key is read through the store.
    let bytes = match (proof.proof.is_empty(), proof.proof_key.is_empty()) {
        (false, _) => proof.proof,
        (true, false) => match gw.store.get(&proof.proof_key).await {
            Ok(bytes) => bytes,
            Err(e) => return fail(gw, file, number, Some(status), format!("cannot read the proof: {e}")).await,
        },
        (true, true) => return fail(gw, file, number, Some(status), "GetProof returned no proof".into()).await,
    };
    let summary = ProofSummary {
        batch_number: number.0,
        protocol_version: version.to_string(),
        file: file.name.clone(),
        transactions,
        proof_bytes: bytes.len(),
        wall_secs: wall_secs(status.created_unix_ms, status.finished_unix_ms),
        compute_secs: (status.compute_secs * 1000.0).round() / 1000.0,
        rounds: RoundCount::from_progress(&status.rounds),
        status: Outcome::Proven.word(),
    };
    let written = async {
        gw.outbox.write(&file.stem, "proof", &bytes).await?;
        gw.outbox.write(&file.stem, "json", summary.to_json()).await
    };
    if let Err(e) = written.await {
        let reason = format!("cannot write the proof to {}: {e}", gw.outbox.dir().display());
        tracing::error!(%number, file = %file.name, "{reason}");
        return Report { outcome: Outcome::Failed(reason), ..report(file, number, Some(status)) };
    }
    tracing::info!(
        %number,
        file = %file.name,
        proof_bytes = summary.proof_bytes,
        wall_secs = summary.wall_secs,
        "proven: {}",
        gw.outbox.path(&file.stem, "proof").display()
    );
    Report { proof_bytes: Some(summary.proof_bytes), outcome: Outcome::Proven, ..report(file, number, Some(status)) }
}

/// The batch failed (at the scheduler, or its proof could not be fetched): logs it and writes
/// `<stem>.error`.
async fn fail(
    gw: &Gateway,
    file: &BatchFile,
    number: BatchNumber,
    status: Option<&BatchStatus>,
    reason: String,
) -> Report {
    tracing::error!(%number, file = %file.name, "failed: {reason}");
    if let Err(e) = gw.outbox.write_error(&file.stem, &file.name, &reason).await {
        tracing::error!(%number, file = %file.name, "cannot write {}: {e}", gw.outbox.path(&file.stem, "error").display());
    }
    Report { outcome: Outcome::Failed(reason), ..report(file, number, status) }
}

/// A report with what the scheduler's last status says (an interruption by default).
fn report(file: &BatchFile, number: BatchNumber, status: Option<&BatchStatus>) -> Report {
    let mut report = Report::early(&file.name, Some(number.0), Outcome::Interrupted);
    if let Some(status) = status {
        report.rounds = RoundCount::from_progress(&status.rounds);
        report.wall_secs = Some(wall_secs(status.created_unix_ms, status.finished_unix_ms));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{sample_batch, serve, status, Script};
    use proofmesh_core::LocalStore;
    use std::collections::HashMap;

    /// A gateway in a temporary directory, connected to a fake scheduler playing `scripts`, and
    /// a batch file `batch_<number>.bin` taken from its inbox.
    async fn gateway(
        number: u32,
        scripts: HashMap<u32, Script>,
    ) -> (tempfile::TempDir, Gateway, Incoming, Arc<std::sync::Mutex<crate::testing::Calls>>) {
        let dir = tempfile::tempdir().unwrap();
        let (url, calls) = serve(scripts).await;
        let shutdown = CancellationToken::new();
        let client = crate::scheduler::connect(&url, &shutdown).await.unwrap().unwrap();
        let inbox = Inbox::create(dir.path().join("inbox")).unwrap();
        let outbox = Outbox::create(dir.path().join("outbox")).unwrap();
        let gw = Gateway {
            client,
            store: Arc::new(LocalStore::new(dir.path().join("data"))),
            inbox: inbox.clone(),
            outbox: outbox.clone(),
            progress: Progress::off(),
            shutdown,
        };
        let path = inbox.dir().join(format!("batch_{number}.bin"));
        std::fs::write(&path, sample_batch(number)).unwrap();
        let incoming = inbox.take(path, &outbox).await.unwrap();
        (dir, gw, incoming, calls)
    }

    #[tokio::test]
    async fn proven_batch_is_fetched_and_written_even_after_the_watch_stream_ended_early() {
        use BatchState::{Proven, Proving};
        let done = [
            (0, "basic", 4, 4),
            (1, "leaf", 1, 1),
            (2, "node", 1, 1),
            (3, "recursion_tip", 1, 1),
            (4, "scheduler", 1, 1),
            (5, "compression", 1, 1),
        ];
        let script = Script {
            // The first stream ends while the batch is still proving (a scheduler restart).
            watches: vec![
                vec![status(5, Proving, &[(0, "basic", 4, 1)])],
                vec![status(5, Proving, &[(0, "basic", 4, 4)]), status(5, Proven, &done)],
            ],
            proof: b"final proof bytes".to_vec(),
        };
        let (_dir, gw, incoming, calls) = gateway(5, HashMap::from([(5, script)])).await;

        let report = prove(gw.clone(), incoming).await;

        assert_eq!(report.outcome, Outcome::Proven);
        assert_eq!((report.batch_number, report.proof_bytes, report.wall_secs), (Some(5), Some(17), Some(12.5)));
        assert_eq!(crate::summary::compact_circuits(&report.rounds), "4/1/1/1/1");
        assert_eq!(std::fs::read(gw.outbox.path("batch_5", "proof")).unwrap(), b"final proof bytes");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(gw.outbox.path("batch_5", "json")).unwrap()).unwrap();
        assert_eq!(json["protocol_version"], "0.1.0");
        assert_eq!(json["file"], "batch_5.bin");
        assert_eq!((json["transactions"].as_u64(), json["proof_bytes"].as_u64()), (Some(1), Some(17)));
        assert_eq!((json["wall_secs"].as_f64(), json["compute_secs"].as_f64()), (Some(12.5), Some(30.123)));
        assert_eq!(json["rounds"].as_array().unwrap().len(), 6);
        assert_eq!(json["status"], "proven");
        assert!(gw.inbox.dir().join("submitted/batch_5.bin").exists());
        assert!(!gw.outbox.path("batch_5", "error").exists());

        let (watches, submit) = {
            let calls = calls.lock().unwrap();
            (calls.watches[&5], calls.submits[0].clone())
        };
        assert_eq!(watches, 2, "watched again after the stream ended");
        assert_eq!(
            (submit.batch_number, submit.input_key.as_str(), submit.priority),
            (5, "batches/000005/batch.bin", 0)
        );
        assert_eq!(submit.protocol_version, Some(proofmesh_proto::v1::ProtocolVersion { minor: 1, patch: 0 }));
        assert_eq!(gw.store.get(&submit.input_key).await.unwrap(), sample_batch(5));
    }

    #[tokio::test]
    async fn failed_batch_gets_the_schedulers_error() {
        let mut failed = status(6, BatchState::Failed, &[(0, "basic", 4, 3)]);
        failed.error = "job (0, 2) seq 1: out of attempts".into();
        let script = Script { watches: vec![vec![failed]], proof: Vec::new() };
        let (_dir, gw, incoming, _calls) = gateway(6, HashMap::from([(6, script)])).await;

        let report = prove(gw.clone(), incoming).await;

        assert_eq!(report.outcome, Outcome::Failed("job (0, 2) seq 1: out of attempts".into()));
        let error = std::fs::read_to_string(gw.outbox.path("batch_6", "error")).unwrap();
        assert_eq!(error, "batch_6.bin: job (0, 2) seq 1: out of attempts\n");
        assert!(!gw.outbox.path("batch_6", "proof").exists());
    }

    #[tokio::test]
    async fn a_batch_the_scheduler_does_not_know_fails_instead_of_hanging() {
        // The fake answers NOT_FOUND to WatchBatch for a batch without a script.
        let (_dir, gw, incoming, _calls) = gateway(8, HashMap::new()).await;
        let report = prove(gw.clone(), incoming).await;
        assert!(matches!(&report.outcome, Outcome::Failed(r) if r.starts_with("WatchBatch: NotFound")), "{report:?}");
        assert!(gw.outbox.path("batch_8", "error").exists());
    }

    #[tokio::test]
    async fn shutdown_interrupts_a_watch_and_leaves_no_result() {
        let script = Script { watches: vec![vec![]], proof: Vec::new() };
        let (_dir, gw, incoming, _calls) = gateway(9, HashMap::from([(9, script)])).await;
        let stopper = gw.shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            stopper.cancel();
        });
        let report = prove(gw.clone(), incoming).await;
        assert_eq!(report.outcome, Outcome::Interrupted);
        assert!(!gw.outbox.has_result("batch_9"));
        // Left in submitted/ for the next start to watch again.
        assert_eq!(gw.inbox.unfinished_submissions(&gw.outbox).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_batch_number_stored_with_other_bytes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let key = store_input(&store, BatchNumber(3), b"first".to_vec()).await.unwrap();
        assert_eq!(key, keys::batch_input(BatchNumber(3)));
        assert_eq!(store.get(&key).await.unwrap(), b"first");
        // The same bytes again (a restart, the same file dropped twice): fine.
        assert_eq!(store_input(&store, BatchNumber(3), b"first".to_vec()).await.unwrap(), key);
        let err = store_input(&store, BatchNumber(3), b"second".to_vec()).await.unwrap_err();
        assert!(err.contains("batch 3 is already stored"), "{err}");
        assert_eq!(store.get(&key).await.unwrap(), b"first", "the stored batch is untouched");
    }
}
