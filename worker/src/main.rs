//! `proofmesh-worker --role witness-generator|wvg|prover`: registers with the scheduler and works
//! leases until SIGINT/SIGTERM, then drains: takes nothing new, finishes what it holds within
//! `--drain-grace-secs`, hands back the rest, and exits 0.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::{Parser, ValueEnum};

use proofmesh_proto::v1::{self, Role};
use proofmesh_worker::lease::{this_host, LeaseClient, Registration};
use proofmesh_worker::prover::ProverService;
use proofmesh_worker::runner::{self, Stage};
use proofmesh_worker::setups::{ArtifactMirror, Setups};
use proofmesh_worker::stream::{CONNECTION_WINDOW, STREAM_WINDOW};
use proofmesh_worker::{wg, wvg};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// A worker role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RoleArg {
    /// Builds each round's circuit inputs.
    WitnessGenerator,
    /// Synthesizes witness vectors and streams them to provers.
    Wvg,
    /// Proves witness vectors it is sent.
    Prover,
}

/// A Proofmesh worker.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The role.
    #[arg(long, env = "PROOFMESH_ROLE", value_enum)]
    role: RoleArg,
    /// The scheduler's URL.
    #[arg(long, env = "PROOFMESH_SCHEDULER", default_value = "http://127.0.0.1:50051")]
    scheduler: String,
    /// Zone (in Kubernetes, from topology.kubernetes.io/zone).
    #[arg(long, env = "PROOFMESH_ZONE", default_value = "local")]
    zone: String,
    /// Region.
    #[arg(long, env = "PROOFMESH_REGION", default_value = "local")]
    region: String,
    /// Host name (a WVG gets a prover on the same host first); default: this machine's.
    #[arg(long, env = "PROOFMESH_HOST")]
    host: Option<String>,
    /// Name for logs and Admin; default: made up by the scheduler.
    #[arg(long, env = "PROOFMESH_NAME", default_value = "")]
    name: String,
    /// Jobs at once (provers: witness vectors proven at once).
    #[arg(long, env = "PROOFMESH_CAPACITY", default_value_t = 1)]
    capacity: u32,
    /// Where the artifacts are: `file:///PATH` or a plain path (a directory every process
    /// shares), or `s3://BUCKET/PREFIX?endpoint=...&region=...` (see README: Artifact stores).
    #[arg(long, visible_alias = "data-dir", env = "PROOFMESH_ARTIFACTS", default_value = "data")]
    artifacts: proofmesh_artifacts::ArtifactsUrl,
    /// Setup data cache directory.
    #[arg(long, env = "PROOFMESH_SETUP_DIR", default_value = ".setup-cache")]
    setup_dir: std::path::PathBuf,
    /// With an object store (`s3://`), setup data is fetched from it when the setup directory
    /// lacks it (and what is built here is published there): this turns that off.
    #[arg(long, env = "PROOFMESH_NO_SETUP_MIRROR")]
    no_setup_mirror: bool,
    /// Provers: address to serve `Prover` on (port 0: any free port).
    #[arg(long, env = "PROOFMESH_LISTEN", default_value = "127.0.0.1:0")]
    listen: String,
    /// Provers: the URL others reach it at; default `http://<listen address>`.
    #[arg(long, env = "PROOFMESH_ADVERTISE")]
    advertise: Option<String>,
    /// WVGs and provers: the prover group whose (aggregation_round, circuit_id) pairs it takes,
    /// from the scheduler's --prover-groups file; default: every pair. An unknown group stops the
    /// worker with the scheduler's reason.
    #[arg(long, env = "PROOFMESH_GROUP")]
    group: Option<u32>,
    /// Protocol versions it proves, e.g. `0.1.0` (repeat the flag, or comma-separate); default:
    /// any the scheduler knows. A version the scheduler has not registered stops the worker.
    #[arg(long = "protocol-version", env = "PROOFMESH_PROTOCOL_VERSIONS", value_delimiter = ',')]
    protocol_versions: Vec<proofmesh_core::ProtocolVersion>,
    /// Memory for the jobs it holds, MiB: the scheduler leases it (WVGs) or matches with it
    /// (provers) jobs whose weights (peak memory, its --job-weights file) sum to at most this.
    /// 0: no limit.
    #[arg(long, env = "PROOFMESH_MEMORY_BUDGET_MIB", default_value_t = 0)]
    memory_budget_mib: u64,
    /// Serve Prometheus metrics on this address (`http://ADDR/metrics`); off when unset.
    #[arg(long, env = "PROOFMESH_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// On SIGTERM, how long the jobs held may run before they are handed back, seconds.
    #[arg(long, env = "PROOFMESH_DRAIN_GRACE_SECS", default_value_t = 60.0)]
    drain_grace_secs: f64,
    /// The longest one job may run in this worker's stage, seconds: past it the job is reported
    /// failed (retryable) as hung and its lease released. Keep it at or under the scheduler's
    /// `--max-lease-age-secs` for the kind.
    #[arg(long, env = "PROOFMESH_STAGE_TIMEOUT_SECS", default_value_t = runner::DEFAULT_STAGE_TIMEOUT_SECS)]
    stage_timeout_secs: f64,
    /// Provers: the largest witness vector accepted, MiB; a larger push is refused from its
    /// header, before anything is allocated for it.
    #[arg(long, env = "PROOFMESH_MAX_WITNESS_VECTOR_MIB", default_value_t = proofmesh_worker::stream::DEFAULT_MAX_WITNESS_VECTOR_MIB,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_witness_vector_mib: u64,
    /// Testing only: a prover that hands in a wrong proof for every job (one byte of each proof
    /// flipped), to show that the next round catches it (scheduler/tests/lying_prover.rs).
    #[arg(long, hide = true)]
    fault_wrong_proofs: bool,
    /// Provers: limits of the `Prover` server.
    #[command(flatten)]
    grpc: proofmesh_proto::GrpcLimits,
    /// TLS to the scheduler and between WVGs and provers (a prover serves with it).
    #[command(flatten)]
    tls: proofmesh_proto::TlsArgs,
    /// WVGs, with TLS: the DNS name every prover's certificate carries, checked instead of the
    /// host of its endpoint (provers advertise pod IPs). Default: the endpoint's host.
    #[arg(long, env = "PROOFMESH_PROVER_TLS_NAME")]
    prover_tls_name: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    proofmesh_core::telemetry::init_logs("info");
    let args = Args::parse();
    anyhow::ensure!(args.capacity >= 1, "--capacity must be at least 1");
    if let Some(addr) = args.metrics_listen {
        proofmesh_core::telemetry::serve_metrics(addr).with_context(|| format!("serving metrics on {addr}"))?;
    }
    // SIGTERM starts the drain; the lease client's stream stays up until the drain is over.
    let drain = CancellationToken::new();
    proofmesh_core::shutdown::cancel_on_signal(drain.clone());
    let stop = CancellationToken::new();
    let grace = std::time::Duration::from_secs_f64(args.drain_grace_secs.max(0.0));

    let artifacts = proofmesh_artifacts::open(&args.artifacts).await.context("opening the artifact store")?;
    let mut setups = Setups::new(&args.setup_dir);
    if args.artifacts.is_object_store() && !args.no_setup_mirror {
        setups = setups.with_mirror(Arc::new(ArtifactMirror::new(artifacts.clone())));
    }
    let setups = Arc::new(setups);
    let role = match args.role {
        RoleArg::WitnessGenerator => Role::WitnessGenerator,
        RoleArg::Wvg => Role::Wvg,
        RoleArg::Prover => Role::Prover,
    };
    let mut reg = Registration {
        scheduler: args.scheduler.clone(),
        role,
        name: args.name.clone(),
        zone: args.zone.clone(),
        region: args.region.clone(),
        host: args.host.clone().unwrap_or_else(this_host),
        capacity: args.capacity,
        prover_endpoint: String::new(),
        protocol_versions: args.protocol_versions.iter().map(|&v| v.into()).collect(),
        prover_group: args.group,
        memory_budget_mib: args.memory_budget_mib,
        tls: args.tls.clone(),
    };

    if role == Role::Prover {
        let listener = tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        reg.prover_endpoint = args.advertise.clone().unwrap_or_else(|| format!("{}://{addr}", args.tls.scheme()));
        let tls = args.tls.server()?;
        tracing::info!("prover serving on {addr}, advertised as {}", reg.prover_endpoint);
        let (client, _no_leases) = LeaseClient::start(reg, stop.clone());
        report_loaded_setups(&setups, &client);
        let slots = Arc::new(Semaphore::new(args.capacity as usize));
        client.report_busy_slots(args.capacity, slots.clone());
        let service = ProverService {
            slots,
            artifacts,
            setups,
            client: client.clone(),
            draining: drain.clone(),
            max_witness_vector_bytes: args.max_witness_vector_mib << 20,
            check_pusher: tls.is_some(),
            wrong_proofs: args.fault_wrong_proofs,
        };
        let router = args
            .grpc
            .server()
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .add_service(v1::prover_server::ProverServer::new(service).max_decoding_message_size(args.grpc.max_message_bytes()));
        let (router, _serving) = proofmesh_proto::reflection_and_health(router)?;
        let incoming = proofmesh_proto::tls::incoming(listener, tls);
        let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()));
        tokio::select! {
            _ = drain.cancelled() => {}
            _ = client.refused().cancelled_owned() => {}
        }
        client.drain();
        runner::drain(&client, grace).await;
        stop.cancel();
        server.await??;
        return refused(&client);
    }

    let (client, leases) = LeaseClient::start(reg, stop.clone());
    report_loaded_setups(&setups, &client);
    let stage: Arc<dyn Stage> = match role {
        Role::WitnessGenerator => Arc::new(wg::WitnessGenerator { artifacts, setups }),
        _ => Arc::new(wvg::WitnessVectorGenerator { artifacts, setups, channels: Mutex::new(HashMap::new()), tls: args.tls.clone(), prover_tls_name: args.prover_tls_name.clone() }),
    };
    let stage_timeout = std::time::Duration::from_secs_f64(args.stage_timeout_secs.max(0.001));
    runner::run(client.clone(), leases, stage, drain, grace, stage_timeout).await;
    stop.cancel();
    refused(&client)
}

/// Tells the scheduler which circuits' setup data is loaded whenever that changes.
fn report_loaded_setups(setups: &Setups, client: &Arc<LeaseClient>) {
    let client = Arc::downgrade(client);
    setups.on_loaded_changed(move |pairs| {
        if let Some(c) = client.upgrade() {
            c.set_loaded_setups(pairs);
        }
    });
}

/// An error (exit 1) if the scheduler refused this worker's registration.
fn refused(client: &LeaseClient) -> anyhow::Result<()> {
    match client.refusal() {
        Some(reason) => anyhow::bail!(reason),
        None => Ok(()),
    }
}
