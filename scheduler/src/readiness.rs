//! The scheduler's `grpc.health.v1` statuses: `NOT_SERVING` until PostgreSQL answers (the
//! migrations ran before `serve`), then whatever a `SELECT 1` every [`PROBE_EVERY`] says, for the
//! server as a whole (service `""`) and each of its services. Kubernetes readiness probes and
//! `grpcurl ... grpc.health.v1.Health/Check` read it.

use std::sync::Arc;
use std::time::Duration;

use proofmesh_proto::{HealthReporter, ServingStatus};
use tokio_util::sync::CancellationToken;

use crate::state::Shared;

/// How often PostgreSQL is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);
/// How long a probe may take before it counts as a failure.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The services whose status follows the database.
const SERVICES: [&str; 4] = ["", "proofmesh.v1.Scheduler", "proofmesh.v1.Batches", "proofmesh.v1.Admin"];

/// Marks every service `NOT_SERVING`: call before the server starts, so no check can see the
/// reporter's initial `SERVING`.
pub async fn not_serving(health: &HealthReporter) {
    set(health, ServingStatus::NotServing).await;
}

/// Probes PostgreSQL and sets the statuses until `cancel`.
pub async fn run(shared: Arc<Shared>, health: HealthReporter, cancel: CancellationToken) {
    let mut last = Some(ServingStatus::NotServing);
    loop {
        let probe = tokio::time::timeout(PROBE_TIMEOUT, sqlx::query("SELECT 1").execute(&shared.pool)).await;
        let status = match probe {
            Ok(Ok(_)) => ServingStatus::Serving,
            Ok(Err(e)) => {
                tracing::warn!("health: PostgreSQL: {e}");
                ServingStatus::NotServing
            }
            Err(_) => {
                tracing::warn!("health: PostgreSQL did not answer within {PROBE_TIMEOUT:?}");
                ServingStatus::NotServing
            }
        };
        if last != Some(status) {
            tracing::info!("health: {status:?}");
            set(&health, status).await;
            last = Some(status);
        }
        tokio::select! {
            _ = tokio::time::sleep(PROBE_EVERY) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

async fn set(health: &HealthReporter, status: ServingStatus) {
    for service in SERVICES {
        health.set_service_status(service, status).await;
    }
}
