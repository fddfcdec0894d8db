//! `proofmesh-gateway`: takes batch files from an inbox directory, submits them to the
//! scheduler, and hands back final proofs in an outbox directory.
//!
//! For each file `<inbox>/<stem>.<ext>` it writes `<outbox>/<stem>.proof` and `<stem>.json`
//! (proven), or `<outbox>/<stem>.error` (rejected or failed). Writers must put files in place
//! atomically: write `.<name>` (dot-files are ignored), then rename (see `inbox.rs`).
//!
//! Modules: `inbox` (scanning, parsing, moving taken files), `watch` (store, submit, watch,
//! write results), `outbox` (atomic result files), `summary` (the JSON and the `--once` table),
//! `scheduler` (connection and retries), `progress` (bars); shutdown is `proofmesh_core::shutdown`.

mod inbox;
mod outbox;
mod progress;
mod scheduler;
mod summary;
#[cfg(test)]
mod testing;
mod watch;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use proofmesh_core::{ArtifactStore, LocalStore};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::inbox::{Inbox, Scanner};
use crate::outbox::Outbox;
use crate::progress::Progress;
use crate::summary::{Outcome, Report};
use crate::watch::Gateway;

/// The gateway's settings: every flag can also be set through its `PROOFMESH_*` variable.
#[derive(Debug, Parser)]
#[command(name = "proofmesh-gateway", version, about)]
struct Settings {
    /// The scheduler's gRPC address.
    #[arg(long, env = "PROOFMESH_SCHEDULER", default_value = "http://127.0.0.1:50051")]
    scheduler: String,
    /// Root of the artifact store the cluster shares; batch files are stored under
    /// `batches/<number>/batch.bin` there.
    #[arg(long, env = "PROOFMESH_DATA_DIR")]
    data_dir: PathBuf,
    /// Directory batch files arrive in (created if missing). Names starting with `.` are
    /// ignored: write there, then rename into place.
    #[arg(long, env = "PROOFMESH_INBOX")]
    inbox: PathBuf,
    /// Directory results are written to (created if missing): `<stem>.proof` and `<stem>.json`,
    /// or `<stem>.error`.
    #[arg(long, env = "PROOFMESH_OUTBOX")]
    outbox: PathBuf,
    /// Milliseconds between two scans of the inbox. A file is taken once its size and
    /// modification time are unchanged between two scans.
    #[arg(long, env = "PROOFMESH_SCAN_INTERVAL_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..))]
    scan_interval_ms: u64,
    /// Process the files present in the inbox (and batches a previous run left unfinished), wait
    /// until each has ended, print a summary table and exit: 1 if any failed or was rejected.
    #[arg(long, env = "PROOFMESH_ONCE")]
    once: bool,
    /// Draw live progress bars (one per batch: its round and done/total circuits) even when
    /// stdout is not a terminal. They are on by default when it is one.
    #[arg(long, env = "PROOFMESH_PROGRESS")]
    progress: bool,
    /// Serve Prometheus metrics on this address (`http://ADDR/metrics`); off when unset.
    #[arg(long, env = "PROOFMESH_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let settings = Settings::parse();
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

/// Connects, then scans the inbox until shutdown (or, with `--once`, until every file present
/// has ended). Errors: the inbox or outbox cannot be created or listed, or the URL is invalid.
async fn run(settings: Settings, progress: Progress) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    proofmesh_core::shutdown::cancel_on_signal(shutdown.clone());
    if let Some(addr) = settings.metrics_listen {
        proofmesh_core::telemetry::serve_metrics(addr).with_context(|| format!("serving metrics on {addr}"))?;
    }

    let inbox = Inbox::create(&settings.inbox)
        .with_context(|| format!("cannot create the inbox {}", settings.inbox.display()))?;
    let outbox = Outbox::create(&settings.outbox)
        .with_context(|| format!("cannot create the outbox {}", settings.outbox.display()))?;
    let store: Arc<dyn ArtifactStore> = Arc::new(LocalStore::new(&settings.data_dir));
    let Some(client) = scheduler::connect(&settings.scheduler, &shutdown).await? else {
        // Stopped while waiting: a failure only for `--once`, which did not do its job.
        return Ok(if settings.once { ExitCode::FAILURE } else { ExitCode::SUCCESS });
    };
    let gw =
        Gateway { client, store, inbox: inbox.clone(), outbox: outbox.clone(), progress, shutdown: shutdown.clone() };

    // Batches in flight, and how the others ended.
    let mut batches = JoinSet::new();
    let mut ended = Ended { reports: Vec::new(), keep: settings.once, any_failure: false };
    let unfinished = inbox
        .unfinished_submissions(&outbox)
        .with_context(|| format!("cannot list {}/submitted", inbox.dir().display()))?;
    for path in unfinished {
        tracing::info!(file = %path.display(), "submitted by an earlier run, no result yet: watching it again");
        start(&gw, path, &mut batches, &mut ended).await;
    }

    let mut scanner = Scanner::new(&inbox, settings.once);
    let mut tick = tokio::time::interval(Duration::from_millis(settings.scan_interval_ms));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut scanning = true;
    loop {
        tokio::select! {
            // The batch tasks see the token too: they end (interrupted) and are collected below.
            _ = shutdown.cancelled(), if scanning => scanning = false,
            _ = tick.tick(), if scanning => {
                match scanner.scan() {
                    Ok(paths) => {
                        for path in paths {
                            start(&gw, path, &mut batches, &mut ended).await;
                        }
                    }
                    Err(e) => tracing::warn!("cannot scan the inbox {}: {e}", inbox.dir().display()),
                }
                scanning = !scanner.once_done();
            }
            Some(joined) = batches.join_next() => match joined {
                Ok(report) => ended.push(report),
                Err(e) => {
                    tracing::error!("a batch task ended abnormally: {e}");
                    ended.any_failure = true;
                }
            },
            else => break,
        }
    }

    if !settings.once {
        return Ok(ExitCode::SUCCESS);
    }
    ended.reports.sort_by(|a, b| a.file.cmp(&b.file));
    print!("{}", summary::format_table(&ended.reports));
    Ok(if ended.any_failure { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Takes a ready file: a batch that parses gets its own task, a file that does not is rejected
/// at once.
async fn start(gw: &Gateway, path: PathBuf, batches: &mut JoinSet<Report>, ended: &mut Ended) {
    match gw.inbox.take(path, &gw.outbox).await {
        Ok(incoming) => {
            batches.spawn(watch::prove(gw.clone(), incoming));
        }
        Err(report) => ended.push(report),
    }
}

/// How the batch files that ended did.
struct Ended {
    /// Every report, kept only with `--once` (for its table): a long-running gateway only logs.
    reports: Vec<Report>,
    keep: bool,
    /// Whether any file failed, was rejected or interrupted, or a task panicked.
    any_failure: bool,
}

impl Ended {
    fn push(&mut self, report: Report) {
        metrics::counter!(proofmesh_core::telemetry::names::GATEWAY_BATCHES, "outcome" => report.outcome.word()).increment(1);
        if report.outcome == Outcome::Interrupted {
            tracing::info!(file = %report.file, "stopped before it ended: the next start picks it up again");
        }
        self.any_failure |= report.is_failure();
        if self.keep {
            self.reports.push(report);
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
