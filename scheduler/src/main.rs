//! `proofmesh-scheduler`: the daemon. Connects to PostgreSQL, applies the migrations, serves the
//! gRPC API and dispatches leases until SIGINT/SIGTERM.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use proofmesh_core::Geometry;
use proofmesh_scheduler::{Housekeeping, JobWeights, MaxAttempts, MaxLeaseAge, Policy, ProverGroups, Settings, Shared, ZonePolicy};
use tokio_util::sync::CancellationToken;

/// A named geometry.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum GeometryName {
    /// The production default (jobs of seconds, under 2 GiB).
    Default,
    /// Small circuits for tests and demos of small batches.
    Small,
}

/// The Proofmesh scheduler.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "PROOFMESH_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    /// PostgreSQL URL (also read from DATABASE_URL).
    #[arg(long, env = "PROOFMESH_DATABASE_URL")]
    database_url: Option<String>,
    /// Where the artifacts are (final proofs are read from there for GetProof): `file:///PATH` or a plain path (a directory every process
    /// shares), or `s3://BUCKET/PREFIX?endpoint=...&region=...` (see README: Artifact stores).
    #[arg(long, visible_alias = "data-dir", env = "PROOFMESH_ARTIFACTS", default_value = "data")]
    artifacts: proofmesh_artifacts::ArtifactsUrl,
    /// Geometry of new batches.
    #[arg(long, env = "PROOFMESH_GEOMETRY", value_enum, default_value = "default")]
    geometry: GeometryName,
    /// A lease's lifetime without a heartbeat, seconds: how long a hung worker (connected, silent,
    /// e.g. SIGSTOPped or cut off by a half-open network) holds its job. Six heartbeats by default.
    #[arg(long, env = "PROOFMESH_LEASE_TIMEOUT_SECS", default_value_t = 30.0)]
    lease_timeout_secs: f64,
    /// How long the leases of a worker whose stream ended wait for it to reconnect and re-attach
    /// them, seconds: how long a crashed worker holds its job.
    #[arg(long, env = "PROOFMESH_RECONNECT_GRACE_SECS", default_value_t = 10.0)]
    reconnect_grace_secs: f64,
    /// Heartbeat interval workers are told to keep, milliseconds.
    #[arg(long, env = "PROOFMESH_HEARTBEAT_INTERVAL_MS", default_value_t = 5_000)]
    heartbeat_interval_ms: u32,
    /// Attempts per job before the job and its batch fail (every kind; the three flags below override it).
    #[arg(long, env = "PROOFMESH_MAX_ATTEMPTS", default_value_t = 3)]
    max_attempts: i32,
    /// Attempts per witness-generation job.
    #[arg(long, env = "PROOFMESH_MAX_ATTEMPTS_WITNESS_GENERATION")]
    max_attempts_witness_generation: Option<i32>,
    /// Attempts per proving job (WVG and prover).
    #[arg(long, env = "PROOFMESH_MAX_ATTEMPTS_PROVING")]
    max_attempts_proving: Option<i32>,
    /// Attempts per compression job.
    #[arg(long, env = "PROOFMESH_MAX_ATTEMPTS_COMPRESSION")]
    max_attempts_compression: Option<i32>,
    /// The longest a lease may live however often it is renewed, seconds (every kind; the three
    /// flags below override it): a stage that hangs while its worker heartbeats loses the job
    /// after this, with the attempt spent.
    #[arg(long, env = "PROOFMESH_MAX_LEASE_AGE_SECS", default_value_t = 1200.0)]
    max_lease_age_secs: f64,
    /// The longest a witness-generation lease lives, seconds.
    #[arg(long, env = "PROOFMESH_MAX_LEASE_AGE_SECS_WITNESS_GENERATION")]
    max_lease_age_secs_witness_generation: Option<f64>,
    /// The longest a proving lease lives (WVG and prover together), seconds.
    #[arg(long, env = "PROOFMESH_MAX_LEASE_AGE_SECS_PROVING")]
    max_lease_age_secs_proving: Option<f64>,
    /// The longest a compression lease lives, seconds.
    #[arg(long, env = "PROOFMESH_MAX_LEASE_AGE_SECS_COMPRESSION")]
    max_lease_age_secs_compression: Option<f64>,
    /// The largest capacity a worker may register (leases, or a prover's slots, held at once);
    /// a registration above it is refused. A worker's credits never exceed its capacity.
    #[arg(long, env = "PROOFMESH_MAX_WORKER_CAPACITY", default_value_t = 64)]
    max_worker_capacity: u32,
    /// Let a WVG stream to a prover of another zone when none of its zone is free (default: wait).
    #[arg(long, env = "PROOFMESH_CROSS_ZONE")]
    cross_zone: bool,
    /// Serve Prometheus metrics on this address (`http://ADDR/metrics`); off when unset.
    #[arg(long, env = "PROOFMESH_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Prover groups: a TOML file mapping group ids to (aggregation_round, circuit_id) pairs
    /// (zkSync Era's fri_prover_group shape; see docs/scheduling.md). Workers started with
    /// `--group N` take only group N's pairs.
    #[arg(long, env = "PROOFMESH_PROVER_GROUPS")]
    prover_groups: Option<std::path::PathBuf>,
    /// Every this many seconds a batch has waited since it was submitted adds 1 to its priority
    /// (starvation-free order; docs/scheduling.md).
    #[arg(long, env = "PROOFMESH_PRIORITY_AGEING_SECS", default_value_t = 300.0)]
    priority_ageing_secs: f64,
    /// Job weights: a TOML file of peak memory per (aggregation_round, circuit_id), MiB, as
    /// `make bench` writes it (`job-weights.toml`). Workers' `--memory-budget-mib` bounds the sum of
    /// the weights they hold. Unset: every job weighs 0.
    #[arg(long, env = "PROOFMESH_JOB_WEIGHTS")]
    job_weights: Option<std::path::PathBuf>,
    /// A job that has waited this long (seconds) and does not fit a worker's free memory stops
    /// lighter jobs from being leased to that worker until it fits (heavy jobs never starve).
    #[arg(long, env = "PROOFMESH_RESERVE_AFTER_SECS", default_value_t = 120.0)]
    reserve_after_secs: f64,
    /// Do not prefer jobs whose setup data is loaded on the worker (for comparisons).
    #[arg(long, env = "PROOFMESH_NO_SETUP_AFFINITY")]
    no_setup_affinity: bool,
    /// Delete the artifacts of a proven or failed batch (circuit inputs, proofs, the final proof,
    /// the batch file) and its lease history this many seconds after it finished; never those of
    /// a batch still proving.
    #[arg(long, env = "PROOFMESH_ARTIFACT_RETENTION_SECS", default_value_t = 604_800.0)]
    artifact_retention_secs: f64,
    /// Seconds between the house keeper's passes.
    #[arg(long, env = "PROOFMESH_HOUSEKEEPING_INTERVAL_SECS", default_value_t = 60.0)]
    housekeeping_interval_secs: f64,
    /// Keep every artifact for ever (no house keeper).
    #[arg(long, env = "PROOFMESH_KEEP_ARTIFACTS")]
    keep_artifacts: bool,
    /// Database connections.
    #[arg(long, env = "PROOFMESH_DATABASE_CONNECTIONS", default_value_t = 16)]
    database_connections: u32,
    #[command(flatten)]
    grpc: proofmesh_proto::GrpcLimits,
    #[command(flatten)]
    tls: proofmesh_proto::TlsArgs,
    /// A worker (by name) that handed in this many proofs that did not verify when the next
    /// round checked them is quarantined: no more leases or witness vectors until
    /// `Admin.ReleaseWorker`. Its jobs are proven again elsewhere either way.
    #[arg(long, env = "PROOFMESH_QUARANTINE_AFTER_STRIKES", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    quarantine_after_strikes: u32,
    /// With TLS: certificate subjects that may call every `Admin` method, changes included
    /// (`KEY=VALUE[,KEY=VALUE]`, e.g. `CN=alice` or `OU=proofmesh-admins`; repeat the flag or
    /// separate with `;`). Every change is in the audit log (`Admin.ListAuditLog`).
    #[arg(long = "admin-subject", env = "PROOFMESH_ADMIN_SUBJECTS", value_delimiter = ';')]
    admin_subjects: Vec<proofmesh_proto::SubjectPattern>,
    /// With TLS: certificate subjects that may call `Admin`'s read methods.
    #[arg(long = "operator-subject", env = "PROOFMESH_OPERATOR_SUBJECTS", value_delimiter = ';')]
    operator_subjects: Vec<proofmesh_proto::SubjectPattern>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    proofmesh_core::telemetry::init_logs("info,sqlx=warn");
    let args = Args::parse();
    if let Some(addr) = args.metrics_listen {
        proofmesh_core::telemetry::serve_metrics(addr).with_context(|| format!("serving metrics on {addr}"))?;
    }
    let url = args
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .context("no database: pass --database-url or set PROOFMESH_DATABASE_URL / DATABASE_URL")?;
    let options = proofmesh_scheduler::connect_options(&url).context("the database URL")?;
    // Migrations on a connection of their own, without the statement timeout: building an index
    // over a large job history may take longer than any statement of the running scheduler.
    let migrations = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone().options([("statement_timeout", "0")]))
        .await
        .context("connecting to PostgreSQL")?;
    proofmesh_scheduler::migrate(&migrations).await.context("applying migrations")?;
    migrations.close().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(args.database_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .context("connecting to PostgreSQL")?;
    anyhow::ensure!(args.lease_timeout_secs > 0.0, "--lease-timeout-secs must be positive");
    anyhow::ensure!(
        args.heartbeat_interval_ms > 0 && f64::from(args.heartbeat_interval_ms) / 1000.0 < args.lease_timeout_secs,
        "--heartbeat-interval-ms must be positive and shorter than --lease-timeout-secs"
    );
    let max_attempts = MaxAttempts {
        witness_generation: args.max_attempts_witness_generation.unwrap_or(args.max_attempts),
        proving: args.max_attempts_proving.unwrap_or(args.max_attempts),
        compression: args.max_attempts_compression.unwrap_or(args.max_attempts),
    };
    anyhow::ensure!(
        [max_attempts.witness_generation, max_attempts.proving, max_attempts.compression].iter().all(|&n| n >= 1),
        "max attempts must be at least 1"
    );
    let max_lease_age = MaxLeaseAge {
        witness_generation: args.max_lease_age_secs_witness_generation.unwrap_or(args.max_lease_age_secs),
        proving: args.max_lease_age_secs_proving.unwrap_or(args.max_lease_age_secs),
        compression: args.max_lease_age_secs_compression.unwrap_or(args.max_lease_age_secs),
    };
    anyhow::ensure!(
        [max_lease_age.witness_generation, max_lease_age.proving, max_lease_age.compression].iter().all(|&s| s >= args.lease_timeout_secs),
        "the max lease ages ({max_lease_age:?}) must be at least --lease-timeout-secs ({} s)",
        args.lease_timeout_secs
    );
    let prover_groups = match &args.prover_groups {
        Some(path) => {
            let groups = ProverGroups::load(path)?;
            let uncovered = groups.uncovered();
            if !uncovered.is_empty() {
                tracing::warn!(
                    "prover groups {:?}: no group covers the (aggregation_round, circuit_id) pairs {uncovered:?}; \
                     only WVGs and provers started without --group take them",
                    groups.ids()
                );
            }
            Some(groups)
        }
        None => None,
    };
    anyhow::ensure!(args.priority_ageing_secs > 0.0, "--priority-ageing-secs must be positive");
    let job_weights = match &args.job_weights {
        Some(path) => JobWeights::load(path)?,
        None => JobWeights::default(),
    };
    let policy = Policy {
        ageing_secs: args.priority_ageing_secs,
        reserve_after_secs: args.reserve_after_secs.max(0.0),
        setup_affinity: !args.no_setup_affinity,
        job_weights,
    };
    let reranked = proofmesh_scheduler::db::rerank(&pool, policy.ageing_secs).await.context("ordering the queue")?;
    tracing::info!(jobs = reranked, ageing_secs = policy.ageing_secs, "unfinished jobs ordered");
    let settings = Settings {
        geometry: match args.geometry {
            GeometryName::Default => Geometry::default(),
            GeometryName::Small => Geometry::small(),
        },
        lease_secs: args.lease_timeout_secs,
        reconnect_grace_secs: args.reconnect_grace_secs.clamp(0.0, args.lease_timeout_secs),
        max_attempts,
        max_lease_age,
        max_worker_capacity: args.max_worker_capacity,
        zone_policy: if args.cross_zone { ZonePolicy::CrossZoneWhenNoneFree } else { ZonePolicy::SameZoneOnly },
        heartbeat_ms: args.heartbeat_interval_ms,
        prover_groups,
        policy,
        housekeeping: (!args.keep_artifacts).then_some(Housekeeping {
            retention_secs: args.artifact_retention_secs.max(0.0),
            interval_secs: args.housekeeping_interval_secs.max(1.0),
        }),
        grpc: args.grpc.clone(),
        db_pass_deadline: proofmesh_scheduler::DB_PASS_DEADLINE,
        tls: args.tls.clone(),
        quarantine_after_strikes: args.quarantine_after_strikes,
        access: proofmesh_scheduler::access::AccessPolicy {
            admins: args.admin_subjects.clone(),
            operators: args.operator_subjects.clone(),
        },
    };
    if !args.tls.enabled() {
        tracing::warn!("TLS is off (no --tls-cert/--tls-key/--tls-ca): every client that reaches {} is trusted, Admin included", args.listen);
    } else if args.admin_subjects.is_empty() {
        tracing::warn!("no --admin-subject: nobody may change anything through Admin");
    }
    let shared = Shared::new(pool, settings, proofmesh_artifacts::open(&args.artifacts).await.context("opening the artifact store")?);
    let listener = tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    tracing::info!("scheduler listening on {}", listener.local_addr()?);

    let cancel = CancellationToken::new();
    proofmesh_core::shutdown::cancel_on_signal(cancel.clone());
    let server = tokio::spawn(proofmesh_scheduler::serve(shared, listener, cancel.clone()));
    // On SIGTERM `serve` stops leasing, ends every worker stream and returns; leases stay in
    // PostgreSQL for the next scheduler, which the workers re-attach them to.
    server.await??;
    Ok(())
}
