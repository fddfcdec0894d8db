//! `proofmesh-compressor run`: the compression stage as a worker (wraps each batch's scheduler
//! proof into the small final proof). `proofmesh-compressor verify --proof F --batch F`: checks a
//! final proof from its bytes and the batch file alone (exit status 0 if valid, 1 if not).

mod stage;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use proofmesh_circuits::final_proof::verify;

use proofmesh_proto::v1::Role;
use proofmesh_worker::lease::{LeaseClient, Registration};
use proofmesh_worker::runner;
use proofmesh_worker::setups::{ArtifactMirror, Setups};
use tokio_util::sync::CancellationToken;

/// The Proofmesh compressor.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Setup data cache directory (verification builds the compression verifier data there if absent).
    #[arg(long, env = "PROOFMESH_SETUP_DIR", default_value = ".setup-cache", global = true)]
    setup_dir: PathBuf,
    /// With an object store (`s3://`), setup data is fetched from it when the setup directory
    /// lacks it (and what is built here is published there): this turns that off.
    #[arg(long, env = "PROOFMESH_NO_SETUP_MIRROR", global = true)]
    no_setup_mirror: bool,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: `Run`'s artifact URL makes it larger than `Verify`, which costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the compression stage as a worker of the scheduler.
    Run {
        /// The scheduler's URL.
        #[arg(long, env = "PROOFMESH_SCHEDULER", default_value = "http://127.0.0.1:50051")]
        scheduler: String,
        /// Where the artifacts are: `file:///PATH` or a plain path (a directory every process
        /// shares), or `s3://BUCKET/PREFIX?endpoint=...&region=...` (see README: Artifact stores).
        #[arg(long, visible_alias = "data-dir", env = "PROOFMESH_ARTIFACTS", default_value = "data")]
        artifacts: proofmesh_artifacts::ArtifactsUrl,
        /// Zone.
        #[arg(long, env = "PROOFMESH_ZONE", default_value = "local")]
        zone: String,
        /// Region.
        #[arg(long, env = "PROOFMESH_REGION", default_value = "local")]
        region: String,
        /// Name for logs.
        #[arg(long, env = "PROOFMESH_NAME", default_value = "")]
        name: String,
        /// Batches compressed at once.
        #[arg(long, env = "PROOFMESH_CAPACITY", default_value_t = 1)]
        capacity: u32,
        /// Serve Prometheus metrics on this address (`http://ADDR/metrics`); off when unset.
        #[arg(long, env = "PROOFMESH_METRICS_LISTEN")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// On SIGTERM, how long a running compression may finish before it is handed back, seconds.
        #[arg(long, env = "PROOFMESH_DRAIN_GRACE_SECS", default_value_t = 60.0)]
        drain_grace_secs: f64,
        /// The longest one compression may run, seconds: past it the job is reported failed
        /// (retryable) as hung and its lease released.
        #[arg(long, env = "PROOFMESH_STAGE_TIMEOUT_SECS", default_value_t = runner::DEFAULT_STAGE_TIMEOUT_SECS)]
        stage_timeout_secs: f64,
        /// Mutual TLS to the scheduler.
        #[command(flatten)]
        tls: proofmesh_proto::TlsArgs,
    },
    /// Verifies a final proof against a batch file.
    Verify {
        /// The final proof (`<batch>.proof` from the gateway's outbox).
        #[arg(long)]
        proof: PathBuf,
        /// The batch file it should prove.
        #[arg(long)]
        batch: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    proofmesh_core::telemetry::init_logs("info");
    let cli = Cli::parse();
    match cli.command {
        Command::Verify { proof, batch } => {
            let proof_bytes = std::fs::read(&proof).with_context(|| format!("reading {}", proof.display()))?;
            let batch_bytes = std::fs::read(&batch).with_context(|| format!("reading {}", batch.display()))?;
            match verify(&proof_bytes, &batch_bytes, &cli.setup_dir) {
                Ok(public) => {
                    println!(
                        "valid: {} proves batch {} (protocol {}), {} bytes",
                        proof.display(),
                        public.batch_number,
                        public.protocol_version,
                        proof_bytes.len()
                    );
                    Ok(())
                }
                Err(e) => {
                    println!("invalid: {} does not prove {}: {e}", proof.display(), batch.display());
                    std::process::exit(1);
                }
            }
        }
        Command::Run { scheduler, artifacts, zone, region, name, capacity, drain_grace_secs, stage_timeout_secs, metrics_listen, tls } => {
            anyhow::ensure!(capacity >= 1, "--capacity must be at least 1");
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                if let Some(addr) = metrics_listen {
                    proofmesh_core::telemetry::serve_metrics(addr).map_err(|e| anyhow::anyhow!("serving metrics on {addr}: {e}"))?;
                }
                // SIGTERM drains (as the workers do); the stream stays up until the drain is over.
                let drain = CancellationToken::new();
                proofmesh_core::shutdown::cancel_on_signal(drain.clone());
                let stop = CancellationToken::new();
                let reg = Registration {
                    scheduler,
                    role: Role::Compressor,
                    name,
                    zone,
                    region,
                    host: proofmesh_worker::lease::this_host(),
                    capacity,
                    prover_endpoint: String::new(),
                    protocol_versions: vec![],
                    prover_group: None,
                    memory_budget_mib: 0,
                    tls,
                };
                let store = proofmesh_artifacts::open(&artifacts).await.context("opening the artifact store")?;
                let mut setups = Setups::new(&cli.setup_dir);
                if artifacts.is_object_store() && !cli.no_setup_mirror {
                    setups = setups.with_mirror(Arc::new(ArtifactMirror::new(store.clone())));
                }
                let stage = Arc::new(stage::Compressor { artifacts: store, setups: Arc::new(setups) });
                let (client, leases) = LeaseClient::start(reg, stop.clone());
                let grace = std::time::Duration::from_secs_f64(drain_grace_secs.max(0.0));
                let stage_timeout = std::time::Duration::from_secs_f64(stage_timeout_secs.max(0.001));
                runner::run(client, leases, stage, drain, grace, stage_timeout).await;
                stop.cancel();
                Ok(())
            })
        }
    }
}
