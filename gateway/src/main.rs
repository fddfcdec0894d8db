//! `proofmesh-gateway`: hands batches to the scheduler and final proofs back, in one of three
//! modes (`--mode`):
//!
//! - `inbox` (default): batch files arrive in an inbox directory, results go to an outbox
//!   directory (`inbox_mode.rs`; the contract is in the crate's README);
//! - `client`: the gateway polls the L2 node's proof data API for batches and posts the proofs
//!   back (`l2_client.rs`);
//! - `server`: the node pushes batches to the gateway and polls it for the proofs (`l2_server.rs`).
//!
//! All three take a batch along one path (`watch.rs`: store, submit, watch, fetch). Other
//! modules: `inbox` and `outbox` (the directories), `l2_api` (the JSON of both L2 modes, in
//! `docs/gateway-api.md`), `summary` (the JSON summary and the `--once` table), `scheduler`
//! (connection and retries), `progress` (bars); shutdown is `proofmesh_core::shutdown`.

mod inbox;
mod inbox_mode;
mod l2_api;
mod l2_client;
mod l2_server;
mod outbox;
mod progress;
mod scheduler;
mod summary;
#[cfg(test)]
mod testing;
mod watch;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::inbox_mode::{Dirs, InboxSettings};
use crate::l2_client::ClientSettings;
use crate::progress::Progress;
use crate::watch::Gateway;

/// Where batches come from and where proofs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Batch files from `--inbox`, results to `--outbox`.
    Inbox,
    /// Poll the L2 node at `--l2-node-url` for batches, post the proofs back to it.
    Client,
    /// Listen on `--listen`: the L2 node pushes batches and polls for their proofs.
    Server,
}

/// The gateway's settings: every flag can also be set through its `PROOFMESH_*` variable.
#[derive(Debug, Parser)]
#[command(name = "proofmesh-gateway", version, about)]
struct Settings {
    /// The scheduler's gRPC address.
    #[arg(long, env = "PROOFMESH_SCHEDULER", default_value = "http://127.0.0.1:50051")]
    scheduler: String,
    /// The artifact store the cluster shares (a directory, or `s3://BUCKET/PREFIX?...`: README,
    /// Artifact stores); batch files are stored under `batches/<number>/batch.bin` there.
    #[arg(long, visible_alias = "data-dir", env = "PROOFMESH_ARTIFACTS")]
    artifacts: proofmesh_artifacts::ArtifactsUrl,
    /// Where batches come from and where proofs go: `inbox` (directories), `client` (poll the
    /// L2 node), `server` (the L2 node pushes and polls). See `docs/gateway-api.md`.
    #[arg(long, env = "PROOFMESH_MODE", value_enum, default_value_t = Mode::Inbox)]
    mode: Mode,
    /// Inbox mode: directory batch files arrive in (created if missing). Names starting with
    /// `.` are ignored: write there, then rename into place.
    #[arg(long, env = "PROOFMESH_INBOX")]
    inbox: Option<PathBuf>,
    /// Inbox mode: directory results are written to (created if missing): `<stem>.proof` and
    /// `<stem>.json`, or `<stem>.error`.
    #[arg(long, env = "PROOFMESH_OUTBOX")]
    outbox: Option<PathBuf>,
    /// Inbox mode: milliseconds between two scans of the inbox. A file is taken once its size
    /// and modification time are unchanged between two scans.
    #[arg(long, env = "PROOFMESH_SCAN_INTERVAL_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..))]
    scan_interval_ms: u64,
    /// Inbox mode: process the files present in the inbox (and batches a previous run left
    /// unfinished), wait until each has ended, print a summary table and exit: 1 if any failed
    /// or was rejected.
    #[arg(long, env = "PROOFMESH_ONCE")]
    once: bool,
    /// Client mode: the L2 node's base URL; the gateway calls `POST <url>/proof_generation_data`
    /// and `POST <url>/submit_proof/<batch_number>`.
    #[arg(long, env = "PROOFMESH_L2_NODE_URL")]
    l2_node_url: Option<String>,
    /// Client mode: milliseconds between two polls of the node when it had no batch (or did not
    /// answer). After a batch the gateway asks again at once.
    #[arg(long, env = "PROOFMESH_POLL_INTERVAL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    poll_interval_ms: u64,
    /// Server mode: the address the proof data API listens on (`POST /submit_request_for_proofs`,
    /// `POST /poll_generated_proofs`).
    #[arg(long, env = "PROOFMESH_LISTEN", default_value = "127.0.0.1:3320")]
    listen: SocketAddr,
    /// Client and server modes: the largest HTTP body taken from the node, bytes (a batch file
    /// travels base64-encoded: 4/3 of its size). Larger requests are answered 413.
    #[arg(long, env = "PROOFMESH_MAX_BODY_BYTES", default_value_t = 64 << 20,
          value_parser = clap::value_parser!(u64).range(1..=u64::from(u32::MAX)))]
    max_body_bytes: u64,
    /// Draw live progress bars (one per batch: its round and done/total circuits) even when
    /// stdout is not a terminal. They are on by default when it is one.
    #[arg(long, env = "PROOFMESH_PROGRESS")]
    progress: bool,
    /// Serve Prometheus metrics on this address (`http://ADDR/metrics`); off when unset.
    #[arg(long, env = "PROOFMESH_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Mutual TLS to the scheduler.
    #[command(flatten)]
    tls: proofmesh_proto::TlsArgs,
}

impl Settings {
    /// The flags each mode requires (clap's `required_if_eq` does not see `--mode`'s default).
    fn check(self) -> Result<Settings, clap::Error> {
        use clap::CommandFactory;
        let missing = |what: &str| Err(Settings::command().error(clap::error::ErrorKind::MissingRequiredArgument, what));
        match self.mode {
            Mode::Inbox if self.inbox.is_none() || self.outbox.is_none() => {
                missing("--inbox and --outbox are required in inbox mode (--mode inbox, the default)")
            }
            Mode::Client if self.l2_node_url.is_none() => missing("--l2-node-url is required in client mode"),
            _ => Ok(self),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let settings = Settings::parse().check().unwrap_or_else(|e| e.exit());
    let progress = Progress::new(settings.progress, settings.once);
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(progress.log_writer())
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(settings, progress).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Connects to the scheduler, then runs the mode until shutdown (or, with `--once`, until every
/// inbox file has ended). Errors: the inbox or outbox cannot be created or listed, the URL is
/// invalid, the listen address cannot be bound.
async fn run(settings: Settings, progress: Progress) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    proofmesh_core::shutdown::cancel_on_signal(shutdown.clone());
    if let Some(addr) = settings.metrics_listen {
        proofmesh_core::telemetry::serve_metrics(addr).with_context(|| format!("serving metrics on {addr}"))?;
    }

    // The directories first: a typo in them is reported before waiting for the scheduler.
    let dirs = match (settings.mode, &settings.inbox, &settings.outbox) {
        (Mode::Inbox, Some(inbox), Some(outbox)) => Some(Dirs::create(inbox, outbox)?),
        (Mode::Inbox, _, _) => anyhow::bail!("--inbox and --outbox are required in inbox mode"),
        _ => None,
    };
    let store = proofmesh_artifacts::open(&settings.artifacts).await.context("opening the artifact store")?;
    let Some(client) = scheduler::connect(&settings.scheduler, &settings.tls, &shutdown).await? else {
        // Stopped while waiting: a failure only for `--once`, which did not do its job.
        return Ok(if settings.once { ExitCode::FAILURE } else { ExitCode::SUCCESS });
    };
    let gw = Gateway { client, store, progress, shutdown };
    let max_body_bytes = usize::try_from(settings.max_body_bytes).unwrap_or(usize::MAX);

    match settings.mode {
        Mode::Inbox => {
            let dirs = dirs.context("inbox mode without directories")?;
            let inbox = InboxSettings { scan_interval_ms: settings.scan_interval_ms, once: settings.once };
            inbox_mode::run(gw, dirs, inbox).await
        }
        Mode::Client => {
            let node_url = settings.l2_node_url.context("--l2-node-url is required in client mode")?;
            let poll_interval = Duration::from_millis(settings.poll_interval_ms);
            l2_client::run(gw, ClientSettings { node_url, poll_interval, max_body_bytes }).await
        }
        Mode::Server => {
            l2_server::run(gw, settings.listen, max_body_bytes).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{sample_batch, serve, status, Script};
    use clap::CommandFactory;
    use proofmesh_proto::v1::BatchState;
    use std::collections::HashMap;

    #[test]
    fn flags_are_consistent() {
        Settings::command().debug_assert();
    }

    #[test]
    fn directories_are_required_in_inbox_mode_only() {
        let parse = |args: &[&str]| {
            Settings::try_parse_from([&["proofmesh-gateway", "--data-dir=d"], args].concat()).and_then(Settings::check)
        };
        let err = parse(&[]).unwrap_err().to_string();
        assert!(err.contains("--inbox") && err.contains("--outbox"), "{err}");
        assert!(parse(&["--inbox=i", "--outbox=o"]).is_ok());
        let err = parse(&["--mode=client"]).unwrap_err().to_string();
        assert!(err.contains("--l2-node-url"), "{err}");
        let client = parse(&["--mode=client", "--l2-node-url=http://node:3320"]).unwrap();
        assert_eq!((client.mode, client.poll_interval_ms, client.max_body_bytes), (Mode::Client, 1000, 64 << 20));
        let server = parse(&["--mode=server", "--listen=0.0.0.0:4000", "--max-body-bytes=1024"]).unwrap();
        assert_eq!((server.mode, server.listen.port(), server.max_body_bytes), (Mode::Server, 4000, 1024));
        assert!(parse(&["--mode=proxy"]).is_err());
    }

    #[tokio::test]
    async fn once_proves_the_inbox_rejects_junk_and_exits_non_zero() {
        let done = [(0, "basic", 2, 2), (1, "leaf", 1, 1), (2, "node", 1, 1), (3, "tip", 1, 1), (4, "scheduler", 1, 1)];
        let script = Script { watches: vec![vec![status(5, BatchState::Proven, &done)]], proof: b"proof".to_vec() };
        let (url, _calls) = serve(HashMap::from([(5, script)])).await;
        let dir = tempfile::tempdir().unwrap();
        let (inbox, outbox) = (dir.path().join("inbox"), dir.path().join("outbox"));
        std::fs::create_dir(&inbox).unwrap();
        std::fs::write(inbox.join("batch_5.bin"), sample_batch(5)).unwrap();
        std::fs::write(inbox.join("junk.bin"), b"not a batch").unwrap();
        std::fs::write(inbox.join(".partial.bin"), b"still being written").unwrap();
        let arg = |p: &std::path::Path| p.to_str().unwrap().to_string();
        let settings = Settings::try_parse_from([
            "proofmesh-gateway".to_string(),
            format!("--scheduler={url}"),
            format!("--data-dir={}", arg(&dir.path().join("data"))),
            format!("--inbox={}", arg(&inbox)),
            format!("--outbox={}", arg(&outbox)),
            "--scan-interval-ms=20".into(),
            "--once".into(),
        ])
        .and_then(Settings::check)
        .unwrap();

        let code = tokio::time::timeout(Duration::from_secs(20), run(settings, Progress::off())).await.unwrap().unwrap();

        assert_eq!(code, ExitCode::FAILURE, "junk.bin was rejected");
        assert_eq!(std::fs::read(outbox.join("batch_5.proof")).unwrap(), b"proof");
        assert!(outbox.join("batch_5.json").exists());
        assert!(std::fs::read_to_string(outbox.join("junk.error")).unwrap().contains("field `magic`"));
        assert!(inbox.join("submitted/batch_5.bin").exists() && inbox.join("rejected/junk.bin").exists());
        assert!(inbox.join(".partial.bin").exists());
        let mut results: Vec<_> = std::fs::read_dir(&outbox).unwrap().map(|e| e.unwrap().file_name()).collect();
        results.sort();
        assert_eq!(results, ["batch_5.json", "batch_5.proof", "junk.error"]);
    }
}
