//! The one path every mode takes a batch along: parse it, store it, submit it ([`submit`]), then
//! watch it until the scheduler says proven or failed and fetch the proof ([`follow`]).
//!
//! The modes differ only in where batches come from and where results go: `inbox_mode.rs`
//! (directories), `l2_client.rs` (the gateway polls the L2 node), `l2_server.rs` (the node pushes
//! and polls). Every step waits out a scheduler that is away (restarts lose nothing: the
//! scheduler owns the batch's state, and `SubmitBatch` is idempotent), and stops when the gateway
//! shuts down.

use std::sync::Arc;

use proofmesh_core::batch::{Batch, BatchFormatError};
use proofmesh_core::{keys, ArtifactError, ArtifactStore, BatchNumber, ProtocolVersion};
use proofmesh_proto::v1::batches_client::BatchesClient;
use proofmesh_proto::v1::{BatchState, BatchStatus, GetProofRequest, SubmitBatchRequest, WatchBatchRequest};
use sha2::Digest;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Code;

use crate::progress::{BatchBar, Progress};
use crate::scheduler::{backoff, describe, is_transient, retrying, Stop};
use crate::summary::{wall_secs, Outcome, ProofSummary, RoundCount};

/// What every batch task of every mode shares. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Gateway {
    /// The scheduler's `Batches` service.
    pub client: BatchesClient<Channel>,
    /// Where batch files are stored for the cluster to read.
    pub store: Arc<dyn ArtifactStore>,
    /// The progress bars.
    pub progress: Progress,
    /// Cancelled on shutdown.
    pub shutdown: CancellationToken,
}

/// A batch file that parsed: what the scheduler needs to know of it, and its bytes for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedBatch {
    /// The batch's number, from the file.
    pub number: BatchNumber,
    /// The protocol version it is proven under, from the file.
    pub protocol_version: ProtocolVersion,
    /// Transactions in the batch.
    pub transactions: usize,
    /// The file's bytes, as received.
    pub bytes: Vec<u8>,
}

impl ParsedBatch {
    /// Parses a batch file (`proofmesh_core::batch`). Errors: the first bad field and its offset.
    pub(crate) fn parse(bytes: Vec<u8>) -> Result<ParsedBatch, BatchFormatError> {
        let batch = Batch::from_bytes(&bytes)?;
        Ok(ParsedBatch {
            number: batch.number,
            protocol_version: batch.protocol_version,
            transactions: batch.transactions.len(),
            bytes,
        })
    }

    /// A copy without the bytes: what a task that follows the batch needs of it.
    pub(crate) fn without_bytes(&self) -> ParsedBatch {
        ParsedBatch {
            number: self.number,
            protocol_version: self.protocol_version,
            transactions: self.transactions,
            bytes: Vec::new(),
        }
    }
}

/// Why [`submit`] did not hand a batch to the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NotTaken {
    /// The gateway is shutting down; the batch may be stored, not submitted. Sending it again
    /// later is safe.
    Shutdown,
    /// The batch number is already stored with other contents: batch numbers must be unique.
    Conflict(String),
    /// The artifact store failed (reading or writing the batch).
    Store(String),
    /// The scheduler refused the batch with `code` (e.g. `FAILED_PRECONDITION`: its protocol
    /// version is not registered or is retired). The text names the call.
    Refused { code: Code, reason: String },
}

impl NotTaken {
    /// The reason in one line, for logs, `.error` files and HTTP answers.
    pub(crate) fn reason(&self) -> String {
        match self {
            NotTaken::Shutdown => "the gateway is shutting down".into(),
            NotTaken::Conflict(r) | NotTaken::Store(r) | NotTaken::Refused { reason: r, .. } => r.clone(),
        }
    }
}

/// Stores the batch file, then submits it. `Ok(true)`: the scheduler created the batch (new
/// work); `Ok(false)`: it already had this batch number (no new work: the same bytes are stored
/// under it, see [`store_input`]).
pub(crate) async fn submit(gw: &Gateway, batch: &ParsedBatch) -> Result<bool, NotTaken> {
    let number = batch.number;
    let input_key = store_input(gw.store.as_ref(), number, batch.bytes.clone()).await?;
    let request = SubmitBatchRequest {
        batch_number: number.0,
        protocol_version: Some(batch.protocol_version.into()),
        input_key,
        priority: 0,
        // The scheduler keeps it: a later batch of this number with other bytes is refused even
        // once the stored file is gone (the house keeper deleted it).
        content_sha256: sha2::Sha256::digest(&batch.bytes).to_vec(),
    };
    let submitted = retrying(&gw.shutdown, number, "SubmitBatch", || {
        let mut client = gw.client.clone();
        let request = request.clone();
        async move { client.submit_batch(request).await }
    })
    .await;
    match submitted {
        Ok(response) => Ok(response.get_ref().created),
        Err(Stop::Shutdown) => Err(NotTaken::Shutdown),
        Err(Stop::Refused { code: Code::AlreadyExists, reason }) => Err(NotTaken::Conflict(reason)),
        Err(Stop::Refused { code, reason }) => Err(NotTaken::Refused { code, reason }),
    }
}

/// Stores the batch file under [`keys::batch_input`] and returns the key. A batch already
/// stored with the same bytes (a resubmission) is left as it is; one stored with other bytes is
/// refused ([`NotTaken::Conflict`]), since proving it would hand back another batch's proof.
pub(crate) async fn store_input(
    store: &dyn ArtifactStore,
    number: BatchNumber,
    bytes: Vec<u8>,
) -> Result<String, NotTaken> {
    let key = keys::batch_input(number);
    match store.get(&key).await {
        Ok(existing) if existing == bytes => return Ok(key),
        Ok(_) => {
            return Err(NotTaken::Conflict(format!(
                "batch {number} is already stored at `{key}` with other contents: batch numbers must be unique"
            )))
        }
        Err(ArtifactError::NotFound { .. }) => {}
        Err(e) => return Err(NotTaken::Store(format!("cannot store the batch: {e}"))),
    }
    store.put(&key, bytes).await.map_err(|e| NotTaken::Store(format!("cannot store the batch: {e}")))?;
    Ok(key)
}

/// How a submitted batch ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Ended {
    /// Proven: the final proof's bytes and the scheduler's last status.
    Proven { proof: Vec<u8>, status: BatchStatus },
    /// The scheduler failed the batch, or its proof could not be fetched.
    Failed { reason: String, status: Option<BatchStatus> },
    /// The gateway is shutting down; watching it again later picks it up.
    Interrupted,
}

impl Ended {
    /// The outcome word (`proven`, `failed`, `interrupted`).
    pub(crate) fn word(&self) -> &'static str {
        match self {
            Ended::Proven { .. } => Outcome::Proven.word(),
            Ended::Failed { .. } => "failed",
            Ended::Interrupted => Outcome::Interrupted.word(),
        }
    }
}

/// Watches a submitted batch until it ends and, when proven, fetches its proof. `label` names it
/// in logs and on its progress bar (the file name, or `batch N` for the L2 modes).
pub(crate) async fn follow(gw: &Gateway, number: BatchNumber, label: &str) -> Ended {
    let bar = gw.progress.batch(label, number.0);
    let ended = match watch(gw, number, &bar).await {
        Ok(status) if status.state() == BatchState::Proven => fetch(gw, number, status).await,
        Ok(status) => {
            let reason = if status.error.is_empty() {
                "failed (the scheduler gave no reason)".into()
            } else {
                status.error.clone()
            };
            Ended::Failed { reason, status: Some(status) }
        }
        Err(Stop::Shutdown) => Ended::Interrupted,
        Err(Stop::Refused { reason, .. }) => Ended::Failed { reason, status: None },
    };
    bar.finish(ended.word());
    ended
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
                Err(s) => return Err(Stop::Refused { code: s.code(), reason: format!("WatchBatch: {}", describe(&s)) }),
            }
        }
        tracing::info!(%number, "watching it again in {:?}", backoff.delay());
        if !backoff.wait(&gw.shutdown).await {
            return Err(Stop::Shutdown);
        }
    }
}

/// The batch is proven: fetches its proof (inline, or through the store when the scheduler
/// only names its key).
async fn fetch(gw: &Gateway, number: BatchNumber, status: BatchStatus) -> Ended {
    let response = retrying(&gw.shutdown, number, "GetProof", || {
        let mut client = gw.client.clone();
        async move { client.get_proof(GetProofRequest { batch_number: number.0 }).await }
    })
    .await;
    let proof = match response {
        Ok(response) => response.into_inner(),
        Err(Stop::Shutdown) => return Ended::Interrupted,
        Err(Stop::Refused { reason, .. }) => return Ended::Failed { reason, status: Some(status) },
    };
    match (proof.proof.is_empty(), proof.proof_key.is_empty()) {
        (false, _) => Ended::Proven { proof: proof.proof, status },
        (true, false) => match gw.store.get(&proof.proof_key).await {
            Ok(bytes) => Ended::Proven { proof: bytes, status },
            Err(e) => Ended::Failed { reason: format!("cannot read the proof: {e}"), status: Some(status) },
        },
        (true, true) => Ended::Failed { reason: "GetProof returned no proof".into(), status: Some(status) },
    }
}

/// The summary of a proven batch, as `<stem>.json` and the L2 API's `summary` give it. `file`:
/// the batch file's name in the inbox (`None` for batches from the L2 node).
pub(crate) fn summary(batch: &ParsedBatch, file: Option<String>, proof_bytes: usize, status: &BatchStatus) -> ProofSummary {
    ProofSummary {
        batch_number: batch.number.0,
        protocol_version: batch.protocol_version.to_string(),
        file,
        transactions: batch.transactions,
        proof_bytes,
        wall_secs: wall_secs(status.created_unix_ms, status.finished_unix_ms),
        compute_secs: (status.compute_secs * 1000.0).round() / 1000.0,
        rounds: RoundCount::from_progress(&status.rounds),
        status: Outcome::Proven.word(),
    }
}

/// Counts a batch that ended (`proofmesh_gateway_batches_total{outcome}`), whatever the mode.
pub(crate) fn count(outcome: &'static str) {
    metrics::counter!(proofmesh_core::telemetry::names::GATEWAY_BATCHES, "outcome" => outcome).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proofmesh_core::LocalStore;

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
        assert!(matches!(&err, NotTaken::Conflict(r) if r.contains("batch 3 is already stored")), "{err:?}");
        assert_eq!(store.get(&key).await.unwrap(), b"first", "the stored batch is untouched");
    }
    #[tokio::test]
    async fn other_contents_under_a_number_whose_file_is_gone_are_refused_by_the_scheduler() {
        use crate::testing::{gateway, sample_batch, sample_batch_with};
        let (_dir, gw, calls) = gateway(std::collections::HashMap::new()).await;
        let first = ParsedBatch::parse(sample_batch(4)).unwrap();
        assert!(submit(&gw, &first).await.unwrap());
        // The house keeper deleted the stored file: only the scheduler's record of the contents
        // is left to compare with.
        gw.store.delete_prefix(&keys::batch_prefix(BatchNumber(4))).await.unwrap();
        let other = ParsedBatch::parse(sample_batch_with(4, ProtocolVersion { minor: 1, patch: 0 }, [9, 9, 9, 9])).unwrap();
        let err = submit(&gw, &other).await.unwrap_err();
        assert!(matches!(&err, NotTaken::Conflict(r) if r.contains("other contents")), "{err:?}");
        assert_eq!(calls.lock().unwrap().submits[0].content_sha256, sha2::Sha256::digest(sample_batch(4)).to_vec());
    }
}
