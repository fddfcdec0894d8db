//! The house keeper: deletes the artifacts of finished batches (proven or failed) once they have
//! been finished for the retention period (`--artifact-retention-secs`), and their lease history;
//! and the records of worker connections that ended longer ago than that and hold no lease.
//! The artifacts of a batch still proving are never touched: only batches whose status is not
//! `proving` are selected, and a batch never goes back to proving. A timer task (housekeeping is
//! not latency-sensitive): every `interval` it cleans at most [`PER_PASS`] batches, oldest first.
//! Retries are free: a batch is marked cleaned only after its artifacts are gone.

use std::sync::Arc;
use std::time::Duration;

use proofmesh_core::{keys, BatchNumber};
use tokio_util::sync::CancellationToken;

use crate::db;
use crate::state::Shared;

/// Batches cleaned per pass at most.
pub const PER_PASS: i64 = 100;

/// Cleans every `interval` until `cancel`; `retention_secs` after a batch finished.
pub async fn run(shared: Arc<Shared>, retention_secs: f64, interval: Duration, cancel: CancellationToken) {
    loop {
        match clean(&shared, retention_secs).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(batches = n, retention_secs, "house keeper: artifacts of finished batches deleted"),
            Err(e) => tracing::warn!("house keeper: {e:#} (tried again next pass)"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// One pass: returns how many batches were cleaned. Errors: the database or the artifact store.
pub async fn clean(shared: &Shared, retention_secs: f64) -> anyhow::Result<u64> {
    let due = db::batches_to_clean(&shared.pool, retention_secs, PER_PASS).await?;
    let mut cleaned = 0;
    for batch in due {
        let number = BatchNumber(u32::try_from(batch)?);
        let files = shared.artifacts.delete_prefix(&keys::batch_prefix(number)).await?;
        let leases = db::mark_cleaned(&shared.pool, batch).await?;
        tracing::debug!(batch, files, leases, "house keeper: batch cleaned");
        cleaned += 1;
    }
    let workers = db::prune_workers(&shared.pool, retention_secs, PER_PASS * 10).await?;
    if workers > 0 {
        tracing::debug!(workers, "house keeper: records of ended worker connections deleted");
    }
    Ok(cleaned)
}
