//! Liveness: records which worker connections were heard from (`workers.last_seen`, read by
//! `Admin.ListWorkers`) once per heartbeat interval, in one statement for the whole fleet. A
//! heartbeat itself only notes its connection in memory ([`Shared::heard_from`]), so 1,000 idle
//! workers cost one statement per interval, not 1,000 commits.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::db;
use crate::state::Shared;

/// Runs until `cancel`, every `--heartbeat-interval-ms`.
pub async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let every = Duration::from_millis(u64::from(shared.settings.heartbeat_ms.max(10)));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = cancel.cancelled() => return,
        }
        record(&shared).await;
    }
}

/// Writes the connections heard from since the last call (kept for the next call on an error).
pub async fn record(shared: &Shared) {
    let heard: Vec<String> = shared.heard.lock().unwrap_or_else(|e| e.into_inner()).drain().collect();
    if heard.is_empty() {
        return;
    }
    if let Err(e) = db::seen(&shared.pool, &heard).await {
        tracing::warn!("recording heartbeats: {e}");
        shared.heard.lock().unwrap_or_else(|e| e.into_inner()).extend(heard);
    }
}
