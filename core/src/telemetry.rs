//! Logs and metrics shared by the binaries: `tracing` to stderr, filtered by `RUST_LOG`; and a
//! Prometheus `/metrics` endpoint (metrics-exporter-prometheus) serving the `proofmesh_*`
//! metrics named in [`names`], which KEDA or an HPA reads to scale worker pools.

use std::net::SocketAddr;

/// Installs the global subscriber: human-readable lines on stderr, the filter from `RUST_LOG`
/// or else `default` (e.g. `"info"`, `"info,sqlx=warn"`). Call once, first thing in `main`.
pub fn init_logs(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// The metric names every process may export (Prometheus conventions: base units, `_total`
/// counters). Labels: `aggregation_round` (0..4, 5 compression), `circuit_id`,
/// `protocol_version` (`0.1.0`), `status` (waiting, queued, leased), `kind` (witness_generation,
/// proving, compression), `outcome`, `stage`, `role`, `zone`, `direction`.
pub mod names {
    /// Gauge, scheduler: unfinished jobs by aggregation_round, circuit_id, protocol_version, kind, status.
    pub const QUEUE_DEPTH: &str = "proofmesh_queue_depth";
    /// Gauge, scheduler: seconds the oldest queued job has waited.
    pub const OLDEST_QUEUED_AGE: &str = "proofmesh_oldest_queued_job_age_seconds";
    /// Counter, scheduler: leases that ended, by aggregation_round, circuit_id, kind, outcome
    /// (succeeded, failed, handed_back, expired, superseded, rejected).
    pub const JOBS: &str = "proofmesh_jobs_total";
    /// Counter, scheduler: lease statements the dispatcher ran, by result (hit: a lease, miss:
    /// nothing fitted). With set-based dispatch it follows the work, not the idle fleet.
    pub const LEASE_STATEMENTS: &str = "proofmesh_scheduler_lease_statements_total";
    /// Histogram, workers: seconds one job took in a stage (witness_generation, witness_vector,
    /// proving, compression), wall clock.
    pub const JOB_DURATION: &str = "proofmesh_job_duration_seconds";
    /// Histogram, scheduler: seconds from queued to leased, by kind.
    pub const LEASE_WAIT: &str = "proofmesh_lease_wait_seconds";
    /// Counter, WVGs (direction=sent) and provers (direction=received): witness-vector bytes streamed.
    pub const WITNESS_VECTOR_BYTES: &str = "proofmesh_witness_vector_bytes_total";
    /// Gauge, scheduler: connected workers by role and zone.
    pub const WORKERS: &str = "proofmesh_workers";
    /// Counter, gateway: batches by outcome (submitted, proven, failed, rejected).
    pub const GATEWAY_BATCHES: &str = "proofmesh_gateway_batches_total";
}

/// Histogram buckets for durations, seconds: 10 ms to about 45 min.
const SECONDS_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 2700.0];

/// Serves the metrics on `addr` (`http://addr/metrics`, any path answers). Call once, inside a
/// tokio runtime. Errors: the address cannot be bound, or a recorder is installed already.
pub fn serve_metrics(addr: SocketAddr) -> Result<(), metrics_exporter_prometheus::BuildError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(SECONDS_BUCKETS)?
        .install()?;
    describe();
    tracing::info!("metrics on http://{addr}/metrics");
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(names::QUEUE_DEPTH, "Unfinished jobs by aggregation round, circuit id, protocol version, kind and status");
    describe_gauge!(names::OLDEST_QUEUED_AGE, Unit::Seconds, "Age of the oldest queued job");
    describe_counter!(names::JOBS, "Leases that ended, by aggregation round, circuit id, kind and outcome");
    describe_histogram!(names::JOB_DURATION, Unit::Seconds, "Wall time of one job in a stage");
    describe_histogram!(names::LEASE_WAIT, Unit::Seconds, "Time from queued to leased");
    describe_counter!(names::WITNESS_VECTOR_BYTES, Unit::Bytes, "Witness-vector bytes streamed");
    describe_gauge!(names::WORKERS, "Connected workers by role and zone");
    describe_counter!(names::GATEWAY_BATCHES, "Batches the gateway handled, by outcome");
}
