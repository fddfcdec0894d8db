//! The scheduler's metrics (names in `proofmesh_core::telemetry::names`): counters and
//! histograms recorded where leases start and end, and the gauges a task refreshes from the
//! database and the registry every [`REFRESH_EVERY`] (so the queue depth is right after a
//! restart, and costs one grouped query over the unfinished jobs' index).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use proofmesh_core::telemetry::names;
use tokio_util::sync::CancellationToken;

use crate::db::{self, JobLabels};
use crate::state::Shared;

/// How often the gauges are refreshed.
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);

/// A lease ended: counts it in `proofmesh_jobs_total` with `outcome` (succeeded, failed,
/// handed_back, expired, superseded).
pub fn lease_ended(job: &JobLabels, outcome: &'static str) {
    metrics::counter!(names::JOBS,
        "aggregation_round" => job.round.to_string(), "circuit_id" => job.circuit_id.to_string(),
        "kind" => job.kind.clone(), "outcome" => outcome)
    .increment(1);
}

/// A job was leased after waiting `secs` in the queue.
pub fn leased(kind: &str, secs: f64) {
    metrics::histogram!(names::LEASE_WAIT, "kind" => kind.to_string()).record(secs);
}

type Labels = Vec<(&'static str, String)>;

/// Refreshes the gauges until `cancel`.
pub async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut previous: BTreeSet<Labels> = BTreeSet::new();
    loop {
        match refresh(&shared, &previous).await {
            Ok(now) => previous = now,
            Err(e) => tracing::warn!("metrics: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(REFRESH_EVERY) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// Sets every gauge; label sets seen last time and gone now are set to 0 (a gauge that just
/// disappeared would leave its last value in Prometheus).
async fn refresh(shared: &Shared, previous: &BTreeSet<Labels>) -> Result<BTreeSet<Labels>, db::DbError> {
    let (depths, oldest) = db::queue_depth(&shared.pool).await?;
    let mut now: BTreeSet<Labels> = BTreeSet::new();
    for d in depths {
        let labels: Labels = vec![
            ("aggregation_round", d.aggregation_round.to_string()),
            ("circuit_id", d.circuit_id.to_string()),
            // As zkSync Era writes it: 0.<minor>.<patch> (ProtocolVersion's Display).
            ("protocol_version", format!("0.{}.{}", d.protocol_minor, d.protocol_patch)),
            ("kind", d.kind),
            ("status", d.status),
        ];
        metrics::gauge!(names::QUEUE_DEPTH, labels_ref(&labels)).set(d.jobs as f64);
        now.insert(labels);
    }
    for (role, zone, n) in shared.registry().census() {
        let labels: Labels = vec![("role", crate::work::role_name(role).to_string()), ("zone", zone)];
        metrics::gauge!(names::WORKERS, labels_ref(&labels)).set(n as f64);
        now.insert(labels);
    }
    for gone in previous.difference(&now) {
        let name = if gone.iter().any(|(k, _)| *k == "role") { names::WORKERS } else { names::QUEUE_DEPTH };
        metrics::gauge!(name, labels_ref(gone)).set(0.0);
    }
    metrics::gauge!(names::OLDEST_QUEUED_AGE).set(oldest);
    Ok(now)
}

fn labels_ref(labels: &Labels) -> Vec<metrics::Label> {
    labels.iter().map(|(k, v)| metrics::Label::new(*k, v.clone())).collect()
}
