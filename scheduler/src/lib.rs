//! Proofmesh's scheduler: the only process that talks to PostgreSQL. It owns the job state of
//! every batch (DESIGN.md section 4) and pushes `(aggregation_round, circuit_id)` leases to
//! workers over their `Scheduler.Work` streams as soon as work exists.
//!
//! - [`graph`]: the jobs of a batch and their dependencies, from the geometry.
//! - [`job_state`]: the job, lease and batch states and every transition (no I/O).
//! - [`db`]: every SQL statement (compare-and-set transitions, leasing with `SKIP LOCKED`).
//! - [`registry`]: the connected workers, their credits and prover slots; zone matching.
//! - [`groups`]: prover groups (which `(aggregation_round, circuit_id)` pairs a worker takes).
//! - [`dispatch`]: the task that turns queued jobs and credits into leases.
//! - [`completions`]: records the completions that arrive together in one transaction.
//! - [`expiry`]: the timer that ends leases past their deadline.
//! - [`liveness`]: records the connections heard from, once per heartbeat interval.
//! - [`readiness`]: `grpc.health.v1` statuses from PostgreSQL's reachability.
//! - [`telemetry`]: the scheduler's Prometheus metrics (queue depth from the database).
//! - [`work`], [`batches`], [`admin`]: the gRPC services; [`access`]: who may call what.

pub mod access;
pub mod admin;
pub mod batches;
pub mod completions;
pub mod db;
pub mod dispatch;
pub mod expiry;
pub mod graph;
pub mod groups;
pub mod housekeeper;
pub mod job_state;
pub mod liveness;
pub mod readiness;
pub mod registry;
pub mod state;
pub mod telemetry;
pub mod weights;
pub mod work;

use std::sync::Arc;

use proofmesh_proto::v1;
use tokio_util::sync::CancellationToken;

pub use groups::ProverGroups;
pub use registry::ZonePolicy;
pub use state::{Housekeeping, MaxAttempts, MaxLeaseAge, Policy, Settings, Shared};
pub use weights::JobWeights;

/// Applies the migrations in `scheduler/migrations` (idempotent). A database that knows no
/// protocol version yet (a fresh install) gets the version these binaries' circuits implement
/// (`ProtocolVersion::CURRENT`), active, its verification key hash left for an operator to record.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("./migrations").run(pool).await?;
    let current = proofmesh_core::ProtocolVersion::CURRENT;
    sqlx::query("INSERT INTO protocol_versions (minor, patch) SELECT $1, $2 WHERE NOT EXISTS (SELECT 1 FROM protocol_versions)")
        .bind(i32::from(current.minor))
        .bind(i32::from(current.patch))
        .execute(pool)
        .await
        .map_err(sqlx::migrate::MigrateError::Execute)?;
    Ok(())
}

/// The longest one statement of the scheduler may run, and a transaction sit idle, in PostgreSQL
/// (`statement_timeout`, `idle_in_transaction_session_timeout`), seconds. The dispatcher and the
/// lease expiry give a whole pass a little longer ([`DB_PASS_DEADLINE`]).
pub const STATEMENT_TIMEOUT_SECS: u64 = 60;

/// How long the dispatcher, the lease expiry, a completion batch or a renewal tick waits for one
/// pass over PostgreSQL before giving it up, closing its connection and trying again: a
/// connection to a server that vanished without a reset (a partition) must not hang any of
/// them for ever (issue 16 rule 7). The daemon's `Settings::db_pass_deadline`.
pub const DB_PASS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(STATEMENT_TIMEOUT_SECS + 5);

/// The options the scheduler connects to PostgreSQL at `url` with:
/// - every transaction READ COMMITTED whatever the server's or role's default, because the job
///   state's rules rely on it (an `UPDATE` that waited for a row re-evaluates on its newest
///   version: the readiness counter, the claim of a result);
/// - a statement timeout and an idle-in-transaction timeout of [`STATEMENT_TIMEOUT_SECS`], so
///   no statement or abandoned transaction holds rows for longer;
/// - TCP keepalives on the server's side of each connection (30 s idle, then every 10 s, 3
///   probes), so the server drops the connections of a scheduler that vanished.
///
/// Errors: `url` is not a PostgreSQL URL.
pub fn connect_options(url: &str) -> Result<sqlx::postgres::PgConnectOptions, sqlx::Error> {
    let timeout = format!("{}s", STATEMENT_TIMEOUT_SECS);
    Ok(url.parse::<sqlx::postgres::PgConnectOptions>()?.options([
        ("default_transaction_isolation", "read committed"),
        ("statement_timeout", timeout.as_str()),
        ("idle_in_transaction_session_timeout", timeout.as_str()),
        ("tcp_keepalives_idle", "30"),
        ("tcp_keepalives_interval", "10"),
        ("tcp_keepalives_count", "3"),
    ]))
}

/// Serves `Scheduler`, `Batches`, `Admin`, reflection and health on `listener` and runs the
/// dispatcher and the lease-expiry timer, until `cancel`. On `cancel` it stops leasing, ends every
/// worker stream (workers reconnect to the next scheduler and re-attach their leases) and leaves
/// the job state as it is in PostgreSQL. With `settings.tls`, only clients with a certificate
/// the CA signed get through (mutual TLS, files reloaded when they change). Errors: the TLS
/// files do not load (checked before anything starts), the transport failed.
pub async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let tls = shared.settings.tls.server()?;
    let dispatcher = tokio::spawn(dispatch::run(shared.clone(), cancel.clone()));
    let expiry = tokio::spawn(expiry::run(shared.clone(), cancel.clone()));
    let completions = tokio::spawn(completions::run(shared.clone(), cancel.clone()));
    let limits = &shared.settings.grpc;
    let max = limits.max_message_bytes();
    let router = limits
        .server()
        .add_service(
            v1::scheduler_server::SchedulerServer::new(work::WorkService::new(shared.clone(), cancel.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(v1::batches_server::BatchesServer::new(batches::BatchService::new(shared.clone())).max_decoding_message_size(max))
        .add_service(v1::admin_server::AdminServer::new(admin::AdminService::new(shared.clone())).max_decoding_message_size(max));
    let (router, health) = proofmesh_proto::reflection_and_health(router)?;
    readiness::not_serving(&health).await;
    let readiness = tokio::spawn(readiness::run(shared.clone(), health, cancel.clone()));
    let gauges = tokio::spawn(telemetry::run(shared.clone(), cancel.clone()));
    let liveness = tokio::spawn(liveness::run(shared.clone(), cancel.clone()));
    let housekeeper = shared.settings.housekeeping.map(|h| {
        let interval = std::time::Duration::from_secs_f64(h.interval_secs.max(0.01));
        tokio::spawn(housekeeper::run(shared.clone(), h.retention_secs, interval, cancel.clone()))
    });
    let incoming = proofmesh_proto::tls::incoming(listener, tls);
    router.serve_with_incoming_shutdown(incoming, cancel.cancelled_owned()).await?;
    dispatcher.await?;
    expiry.await?;
    completions.await?;
    readiness.await?;
    gauges.await?;
    liveness.await?;
    if let Some(h) = housekeeper {
        h.await?;
    }
    Ok(())
}
