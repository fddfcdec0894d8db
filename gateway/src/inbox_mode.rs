//! `--mode inbox` (the default): batch files arrive in an inbox directory, results go to an
//! outbox directory (contract in `inbox.rs`, `outbox.rs` and the crate's README).
//!
//! Each ready file goes along the shared path of `watch.rs`; this module only moves files and
//! writes the outbox: `<stem>.proof` + `<stem>.json`, or `<stem>.error`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use proofmesh_core::BatchNumber;
use proofmesh_proto::v1::BatchStatus;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::inbox::{BatchFile, Inbox, Incoming, Scanner};
use crate::outbox::Outbox;
use crate::summary::{self, wall_secs, Outcome, Report, RoundCount};
use crate::watch::{self, Ended, Gateway, NotTaken};

/// The inbox mode's settings (from the command line).
#[derive(Debug, Clone)]
pub(crate) struct InboxSettings {
    /// Milliseconds between two scans of the inbox.
    pub scan_interval_ms: u64,
    /// `--once`: take the files present, wait for each to end, print the table.
    pub once: bool,
}

/// The two directories. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Dirs {
    /// Where batch files arrive and taken files are moved.
    pub inbox: Inbox,
    /// Where results are written.
    pub outbox: Outbox,
}

impl Dirs {
    /// Both directories, created if missing. Errors name the directory.
    pub(crate) fn create(inbox: &std::path::Path, outbox: &std::path::Path) -> anyhow::Result<Dirs> {
        let inbox = Inbox::create(inbox).with_context(|| format!("cannot create the inbox {}", inbox.display()))?;
        let outbox =
            Outbox::create(outbox).with_context(|| format!("cannot create the outbox {}", outbox.display()))?;
        Ok(Dirs { inbox, outbox })
    }
}

/// Scans the inbox until shutdown (or, with `--once`, until every file present has ended).
/// Batches an earlier run submitted without a result are watched again first. Exit code: with
/// `--once`, 1 if any file did not end proven. Errors: `submitted/` cannot be listed.
pub(crate) async fn run(gw: Gateway, dirs: Dirs, settings: InboxSettings) -> anyhow::Result<ExitCode> {
    // Batches in flight, and how the others ended.
    let mut batches = JoinSet::new();
    let mut ended = Tally { reports: Vec::new(), keep: settings.once, any_failure: false };
    let unfinished = dirs
        .inbox
        .unfinished_submissions(&dirs.outbox)
        .with_context(|| format!("cannot list {}/submitted", dirs.inbox.dir().display()))?;
    for path in unfinished {
        tracing::info!(file = %path.display(), "submitted by an earlier run, no result yet: watching it again");
        start(&gw, &dirs, path, &mut batches, &mut ended).await;
    }

    let mut scanner = Scanner::new(&dirs.inbox, settings.once);
    let mut tick = tokio::time::interval(Duration::from_millis(settings.scan_interval_ms));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut scanning = true;
    loop {
        tokio::select! {
            // The batch tasks see the token too: they end (interrupted) and are collected below.
            _ = gw.shutdown.cancelled(), if scanning => scanning = false,
            _ = tick.tick(), if scanning => {
                match scanner.scan() {
                    Ok(paths) => {
                        for path in paths {
                            start(&gw, &dirs, path, &mut batches, &mut ended).await;
                        }
                    }
                    Err(e) => tracing::warn!("cannot scan the inbox {}: {e}", dirs.inbox.dir().display()),
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
async fn start(gw: &Gateway, dirs: &Dirs, path: PathBuf, batches: &mut JoinSet<Report>, ended: &mut Tally) {
    match dirs.inbox.take(path, &dirs.outbox).await {
        Ok(incoming) => {
            batches.spawn(prove(gw.clone(), dirs.clone(), incoming));
        }
        Err(report) => ended.push(report),
    }
}

/// How the batch files that ended did.
struct Tally {
    /// Every report, kept only with `--once` (for its table): a long-running gateway only logs.
    reports: Vec<Report>,
    keep: bool,
    /// Whether any file failed, was rejected or interrupted, or a task panicked.
    any_failure: bool,
}

impl Tally {
    fn push(&mut self, report: Report) {
        watch::count(report.outcome.word());
        if report.outcome == Outcome::Interrupted {
            tracing::info!(file = %report.file, "stopped before it ended: the next start picks it up again");
        }
        self.any_failure |= report.is_failure();
        if self.keep {
            self.reports.push(report);
        }
    }
}

/// Takes one parsed batch file to its end and reports how it ended. Every outcome is logged and,
/// except an interruption, leaves a result in the outbox (`.proof` + `.json`, or `.error`).
pub(crate) async fn prove(gw: Gateway, dirs: Dirs, incoming: Incoming) -> Report {
    let Incoming { file, batch } = incoming;
    let number = batch.number;
    match watch::submit(&gw, &batch).await {
        Ok(true) => tracing::info!(%number, file = %file.name, "submitted"),
        Ok(false) => tracing::info!(%number, file = %file.name, "already submitted: watching the existing batch"),
        Err(NotTaken::Shutdown) => return Report::early(&file.name, Some(number.0), Outcome::Interrupted),
        Err(refused) => return dirs.inbox.refuse(&file, Some(number), refused.reason(), &dirs.outbox).await,
    }
    if let Err(e) = dirs.inbox.mark_submitted(&file).await {
        tracing::warn!(%number, file = %file.name, "cannot move it to submitted/: {e}");
    }
    match watch::follow(&gw, number, &file.name).await {
        Ended::Proven { proof, status } => {
            let summary = watch::summary(&batch, Some(file.name.clone()), proof.len(), &status);
            deliver(&dirs, &file, number, &proof, &summary.to_json(), &status).await
        }
        Ended::Failed { reason, status } => fail(&dirs, &file, number, status.as_ref(), reason).await,
        Ended::Interrupted => Report::early(&file.name, Some(number.0), Outcome::Interrupted),
    }
}

/// The batch is proven: writes `<stem>.proof` then `<stem>.json`.
async fn deliver(
    dirs: &Dirs,
    file: &BatchFile,
    number: BatchNumber,
    proof: &[u8],
    summary_json: &str,
    status: &BatchStatus,
) -> Report {
    let written = async {
        dirs.outbox.write(&file.stem, "proof", proof).await?;
        dirs.outbox.write(&file.stem, "json", summary_json).await
    };
    if let Err(e) = written.await {
        let reason = format!("cannot write the proof to {}: {e}", dirs.outbox.dir().display());
        tracing::error!(%number, file = %file.name, "{reason}");
        return Report { outcome: Outcome::Failed(reason), ..report(file, number, Some(status)) };
    }
    tracing::info!(
        %number,
        file = %file.name,
        proof_bytes = proof.len(),
        "proven: {}",
        dirs.outbox.path(&file.stem, "proof").display()
    );
    Report { proof_bytes: Some(proof.len()), outcome: Outcome::Proven, ..report(file, number, Some(status)) }
}

/// The batch failed (at the scheduler, or its proof could not be fetched): logs it and writes
/// `<stem>.error`.
async fn fail(
    dirs: &Dirs,
    file: &BatchFile,
    number: BatchNumber,
    status: Option<&BatchStatus>,
    reason: String,
) -> Report {
    tracing::error!(%number, file = %file.name, "failed: {reason}");
    if let Err(e) = dirs.outbox.write_error(&file.stem, &file.name, &reason).await {
        tracing::error!(%number, file = %file.name, "cannot write {}: {e}", dirs.outbox.path(&file.stem, "error").display());
    }
    Report { outcome: Outcome::Failed(reason), ..report(file, number, status) }
}

/// A report with what the scheduler's last status says (an interruption by default).
fn report(file: &BatchFile, number: BatchNumber, status: Option<&BatchStatus>) -> Report {
    let mut report = Report::early(&file.name, Some(number.0), Outcome::Interrupted);
    if let Some(status) = status {
        report.rounds = RoundCount::from_progress(&status.rounds);
        report.wall_secs = Some(wall_secs(status.created_unix_ms, status.finished_unix_ms));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Progress;
    use crate::testing::{sample_batch, serve, status, Script};
    use proofmesh_core::{keys, LocalStore};
    use proofmesh_proto::v1::BatchState;
    use std::collections::HashMap;
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    /// A gateway in a temporary directory, connected to a fake scheduler playing `scripts`, and
    /// a batch file `batch_<number>.bin` taken from its inbox.
    async fn gateway(
        number: u32,
        scripts: HashMap<u32, Script>,
    ) -> (tempfile::TempDir, Gateway, Dirs, Incoming, Arc<std::sync::Mutex<crate::testing::Calls>>) {
        let dir = tempfile::tempdir().unwrap();
        let (url, calls) = serve(scripts).await;
        let shutdown = CancellationToken::new();
        let client = crate::scheduler::connect(&url, &Default::default(), &shutdown).await.unwrap().unwrap();
        let dirs = Dirs::create(&dir.path().join("inbox"), &dir.path().join("outbox")).unwrap();
        let gw = Gateway {
            client,
            store: Arc::new(LocalStore::new(dir.path().join("data"))),
            progress: Progress::off(),
            shutdown,
        };
        let path = dirs.inbox.dir().join(format!("batch_{number}.bin"));
        std::fs::write(&path, sample_batch(number)).unwrap();
        let incoming = dirs.inbox.take(path, &dirs.outbox).await.unwrap();
        (dir, gw, dirs, incoming, calls)
    }

    #[tokio::test]
    async fn proven_batch_is_fetched_and_written_even_after_the_watch_stream_ended_early() {
        use BatchState::{Proven, Proving};
        let done = [
            (0, "basic", 4, 4),
            (1, "leaf", 1, 1),
            (2, "node", 1, 1),
            (3, "recursion_tip", 1, 1),
            (4, "scheduler", 1, 1),
            (5, "compression", 1, 1),
        ];
        let script = Script {
            // The first stream ends while the batch is still proving (a scheduler restart).
            watches: vec![
                vec![status(5, Proving, &[(0, "basic", 4, 1)])],
                vec![status(5, Proving, &[(0, "basic", 4, 4)]), status(5, Proven, &done)],
            ],
            proof: b"final proof bytes".to_vec(),
        };
        let (_dir, gw, dirs, incoming, calls) = gateway(5, HashMap::from([(5, script)])).await;

        let report = prove(gw.clone(), dirs.clone(), incoming).await;

        assert_eq!(report.outcome, Outcome::Proven);
        assert_eq!((report.batch_number, report.proof_bytes, report.wall_secs), (Some(5), Some(17), Some(12.5)));
        assert_eq!(crate::summary::compact_circuits(&report.rounds), "4/1/1/1/1");
        assert_eq!(std::fs::read(dirs.outbox.path("batch_5", "proof")).unwrap(), b"final proof bytes");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dirs.outbox.path("batch_5", "json")).unwrap()).unwrap();
        assert_eq!(json["protocol_version"], "0.1.0");
        assert_eq!(json["file"], "batch_5.bin");
        assert_eq!((json["transactions"].as_u64(), json["proof_bytes"].as_u64()), (Some(1), Some(17)));
        assert_eq!((json["wall_secs"].as_f64(), json["compute_secs"].as_f64()), (Some(12.5), Some(30.123)));
        assert_eq!(json["rounds"].as_array().unwrap().len(), 6);
        assert_eq!(json["status"], "proven");
        assert!(dirs.inbox.dir().join("submitted/batch_5.bin").exists());
        assert!(!dirs.outbox.path("batch_5", "error").exists());

        let (watches, submit) = {
            let calls = calls.lock().unwrap();
            (calls.watches[&5], calls.submits[0].clone())
        };
        assert_eq!(watches, 2, "watched again after the stream ended");
        assert_eq!(
            (submit.batch_number, submit.input_key.as_str(), submit.priority),
            (5, "batches/000005/batch.bin", 0)
        );
        assert_eq!(submit.protocol_version, Some(proofmesh_proto::v1::ProtocolVersion { minor: 1, patch: 0 }));
        assert_eq!(gw.store.get(&submit.input_key).await.unwrap(), sample_batch(5));
    }

    #[tokio::test]
    async fn failed_batch_gets_the_schedulers_error() {
        let mut failed = status(6, BatchState::Failed, &[(0, "basic", 4, 3)]);
        failed.error = "job (0, 2) seq 1: out of attempts".into();
        let script = Script { watches: vec![vec![failed]], proof: Vec::new() };
        let (_dir, gw, dirs, incoming, _calls) = gateway(6, HashMap::from([(6, script)])).await;

        let report = prove(gw.clone(), dirs.clone(), incoming).await;

        assert_eq!(report.outcome, Outcome::Failed("job (0, 2) seq 1: out of attempts".into()));
        let error = std::fs::read_to_string(dirs.outbox.path("batch_6", "error")).unwrap();
        assert_eq!(error, "batch_6.bin: job (0, 2) seq 1: out of attempts\n");
        assert!(!dirs.outbox.path("batch_6", "proof").exists());
    }

    #[tokio::test]
    async fn a_batch_the_scheduler_does_not_know_fails_instead_of_hanging() {
        // The fake answers NOT_FOUND to WatchBatch for a batch without a script.
        let (_dir, gw, dirs, incoming, _calls) = gateway(8, HashMap::new()).await;
        let report = prove(gw.clone(), dirs.clone(), incoming).await;
        assert!(matches!(&report.outcome, Outcome::Failed(r) if r.starts_with("WatchBatch: NotFound")), "{report:?}");
        assert!(dirs.outbox.path("batch_8", "error").exists());
    }

    #[tokio::test]
    async fn shutdown_interrupts_a_watch_and_leaves_no_result() {
        let script = Script { watches: vec![vec![]], proof: Vec::new() };
        let (_dir, gw, dirs, incoming, _calls) = gateway(9, HashMap::from([(9, script)])).await;
        let stopper = gw.shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            stopper.cancel();
        });
        let report = prove(gw.clone(), dirs.clone(), incoming).await;
        assert_eq!(report.outcome, Outcome::Interrupted);
        assert!(!dirs.outbox.has_result("batch_9"));
        // Left in submitted/ for the next start to watch again.
        assert_eq!(dirs.inbox.unfinished_submissions(&dirs.outbox).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_file_whose_number_is_stored_with_other_bytes_is_rejected() {
        let script = Script { watches: vec![vec![]], proof: Vec::new() };
        let (_dir, gw, dirs, incoming, calls) = gateway(4, HashMap::from([(4, script)])).await;
        gw.store.put(&keys::batch_input(BatchNumber(4)), b"another batch 4".to_vec()).await.unwrap();
        // Bounded: were it submitted, the empty watch script would keep it watching for ever.
        let report = tokio::time::timeout(Duration::from_secs(10), prove(gw.clone(), dirs.clone(), incoming))
            .await
            .expect("rejected at once, never watched");
        assert!(matches!(&report.outcome, Outcome::Rejected(r) if r.contains("other contents")), "{report:?}");
        assert!(dirs.inbox.dir().join("rejected/batch_4.bin").exists());
        assert!(calls.lock().unwrap().submits.is_empty(), "never submitted");
    }
}
