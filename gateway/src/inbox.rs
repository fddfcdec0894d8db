//! The inbox: where batch files arrive, and what happens to them before the scheduler sees them.
//!
//! Contract for writers: write the file under a name starting with `.` (ignored) and rename it
//! into place when it is complete. As a second guard, a file is taken only once its size and
//! modification time are the same in two consecutive scans, so a writer that writes in place
//! and pauses for less than one scan interval is not read half-written.
//!
//! A taken file moves to `<inbox>/rejected/` (it does not parse, or the scheduler refused it) or
//! to `<inbox>/submitted/` (the scheduler has it). Files in `submitted/` without a result in the
//! outbox are watched again when the gateway starts.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use proofmesh_core::BatchNumber;

use crate::outbox::Outbox;
use crate::summary::{Outcome, Report};
use crate::watch::ParsedBatch;

/// Subfolder of the inbox for files that will not be proven.
const REJECTED: &str = "rejected";
/// Subfolder of the inbox for files the scheduler has accepted.
const SUBMITTED: &str = "submitted";

/// The inbox directory and its two subfolders. Cheap to clone: paths only.
#[derive(Debug, Clone)]
pub(crate) struct Inbox {
    dir: PathBuf,
}

impl Inbox {
    /// The inbox at `dir`, with `rejected/` and `submitted/` created if missing.
    pub(crate) fn create(dir: impl Into<PathBuf>) -> io::Result<Inbox> {
        let dir = dir.into();
        for sub in [REJECTED, SUBMITTED] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        Ok(Inbox { dir })
    }

    /// The inbox directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Moves a taken file to `rejected/<name>` (replacing a file of that name there).
    pub(crate) async fn reject(&self, file: &BatchFile) -> io::Result<PathBuf> {
        self.move_into(file, REJECTED).await
    }

    /// Moves a taken file to `submitted/<name>`. A no-op for a file already there.
    pub(crate) async fn mark_submitted(&self, file: &BatchFile) -> io::Result<PathBuf> {
        self.move_into(file, SUBMITTED).await
    }

    async fn move_into(&self, file: &BatchFile, sub: &str) -> io::Result<PathBuf> {
        let to = self.dir.join(sub).join(&file.name);
        if file.path != to {
            tokio::fs::rename(&file.path, &to).await?;
        }
        Ok(to)
    }

    /// Files in `submitted/` whose batch has no result in the outbox yet: batches a previous run
    /// submitted but stopped watching.
    pub(crate) fn unfinished_submissions(&self, outbox: &Outbox) -> io::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = regular_files(&self.dir.join(SUBMITTED))?
            .into_iter()
            .map(|(path, _)| path)
            .filter(|path| !outbox.has_result(&BatchFile::new(path.clone()).stem))
            .collect();
        files.sort();
        Ok(files)
    }

    /// Reads and parses a taken file. A file that does not parse (or cannot be read) is moved to
    /// `rejected/`, its reason written to `<stem>.error` in the outbox and logged; the `Err`
    /// is its report.
    pub(crate) async fn take(&self, path: PathBuf, outbox: &Outbox) -> Result<Incoming, Report> {
        let file = BatchFile::new(path);
        let parsed = match tokio::fs::read(&file.path).await {
            Ok(bytes) => ParsedBatch::parse(bytes).map_err(|e| e.to_string()),
            Err(e) => Err(format!("cannot read {}: {e}", file.path.display())),
        };
        match parsed {
            Ok(batch) => Ok(Incoming { file, batch }),
            Err(reason) => Err(self.refuse(&file, None, reason, outbox).await),
        }
    }

    /// Rejects a file for `reason`: logs it, moves the file to `rejected/` and writes
    /// `<stem>.error`. Failing to move or write is logged too; the report says rejected anyway.
    pub(crate) async fn refuse(
        &self,
        file: &BatchFile,
        batch: Option<BatchNumber>,
        reason: String,
        outbox: &Outbox,
    ) -> Report {
        tracing::error!(file = %file.name, "rejected: {reason}");
        if let Err(e) = self.reject(file).await {
            tracing::error!(file = %file.name, "cannot move it to {}/: {e}", REJECTED);
        }
        if let Err(e) = outbox.write_error(&file.stem, &file.name, &reason).await {
            tracing::error!(file = %file.name, "cannot write {}: {e}", outbox.path(&file.stem, "error").display());
        }
        Report::early(&file.name, batch.map(|b| b.0), Outcome::Rejected(reason))
    }
}

/// A file taken from the inbox, by its current path and the names its results are filed under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BatchFile {
    /// Where the file is now.
    pub path: PathBuf,
    /// Its file name (lossy UTF-8): `batch_000042.bin`.
    pub name: String,
    /// The name without its extension: `batch_000042`, the outbox's name for its results.
    pub stem: String,
}

impl BatchFile {
    /// The names of the file at `path`.
    pub(crate) fn new(path: PathBuf) -> BatchFile {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let stem = path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        BatchFile { path, name, stem }
    }
}

/// A taken file that parsed.
#[derive(Debug)]
pub(crate) struct Incoming {
    /// The file.
    pub file: BatchFile,
    /// Its batch.
    pub batch: ParsedBatch,
}

/// Finds inbox files that are ready to be taken. Each file is returned once (until it is
/// replaced by a file of the same name with another size or modification time).
#[derive(Debug)]
pub(crate) struct Scanner {
    dir: PathBuf,
    /// Every candidate of the last scan: its size and modification time, and whether it was taken.
    seen: HashMap<OsString, Seen>,
    /// `--once`: the names present at the first scan that are neither taken nor gone; `None`
    /// until the first scan, and always `None` when scanning runs for ever.
    once_pending: Option<HashSet<OsString>>,
    once: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    len: u64,
    modified: Option<SystemTime>,
    taken: bool,
}

impl Scanner {
    /// A scanner of the inbox's top level. With `once`, only files present at the first scan are
    /// ever returned.
    pub(crate) fn new(inbox: &Inbox, once: bool) -> Scanner {
        Scanner { dir: inbox.dir.clone(), seen: HashMap::new(), once_pending: None, once }
    }

    /// Files ready to be taken now: regular files not starting with `.`, unchanged since the
    /// previous scan, not returned before.
    pub(crate) fn scan(&mut self) -> io::Result<Vec<PathBuf>> {
        let present = regular_files(&self.dir)?;
        let names: HashSet<OsString> = present.iter().filter_map(|(p, _)| p.file_name().map(Into::into)).collect();
        self.seen.retain(|name, _| names.contains(name));
        if self.once {
            let pending = self.once_pending.get_or_insert_with(|| names.clone());
            pending.retain(|name| names.contains(name));
        }
        let mut ready = Vec::new();
        for (path, meta) in present {
            let Some(name) = path.file_name().map(OsString::from) else { continue };
            if let Some(pending) = &mut self.once_pending {
                if !pending.contains(&name) {
                    continue;
                }
            }
            let now = Seen { len: meta.len(), modified: meta.modified().ok(), taken: false };
            match self.seen.get_mut(&name) {
                Some(before) if before.len == now.len && before.modified == now.modified => {
                    if !before.taken {
                        before.taken = true;
                        if let Some(pending) = &mut self.once_pending {
                            pending.remove(&name);
                        }
                        ready.push(path);
                    }
                }
                _ => {
                    self.seen.insert(name, now);
                }
            }
        }
        ready.sort();
        Ok(ready)
    }

    /// `--once`: true when every file present at the first scan has been returned (or is gone).
    pub(crate) fn once_done(&self) -> bool {
        self.once_pending.as_ref().is_some_and(HashSet::is_empty)
    }
}

/// The regular files directly in `dir` whose names do not start with `.`, with their metadata.
/// Subfolders (`rejected/`, `submitted/`) and symbolic links are skipped.
fn regular_files(dir: &Path) -> io::Result<Vec<(PathBuf, std::fs::Metadata)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().as_encoded_bytes().starts_with(b".") {
            continue;
        }
        // The file may vanish between listing and stat (a writer renaming it): skip it.
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_file() {
            files.push((entry.path(), meta));
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::sample_batch;

    fn setup() -> (tempfile::TempDir, Inbox, Outbox) {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::create(dir.path().join("inbox")).unwrap();
        let outbox = Outbox::create(dir.path().join("outbox")).unwrap();
        (dir, inbox, outbox)
    }

    #[tokio::test]
    async fn malformed_file_is_moved_to_rejected_with_an_error_naming_the_field() {
        let (_dir, inbox, outbox) = setup();
        let mut bytes = sample_batch(42);
        bytes[14] = 99; // state_tree_depth: outside 4..=32
        let path = inbox.dir().join("batch_000042.bin");
        std::fs::write(&path, &bytes).unwrap();

        let report = inbox.take(path.clone(), &outbox).await.unwrap_err();

        assert!(!path.exists());
        assert_eq!(std::fs::read(inbox.dir().join("rejected/batch_000042.bin")).unwrap(), bytes);
        let error = std::fs::read_to_string(outbox.path("batch_000042", "error")).unwrap();
        assert!(error.starts_with("batch_000042.bin: "), "{error}");
        assert!(error.contains("field `state_tree_depth` at byte 14"), "{error}");
        assert_eq!(report.file, "batch_000042.bin");
        assert!(matches!(report.outcome, Outcome::Rejected(ref r) if r.contains("state_tree_depth")));
    }

    #[tokio::test]
    async fn valid_file_is_parsed_and_left_in_place() {
        let (_dir, inbox, outbox) = setup();
        let path = inbox.dir().join("b.bin");
        std::fs::write(&path, sample_batch(7)).unwrap();
        let incoming = inbox.take(path.clone(), &outbox).await.unwrap();
        assert_eq!((incoming.batch.number, incoming.batch.transactions), (BatchNumber(7), 1));
        assert_eq!(incoming.file.stem, "b");
        assert!(path.exists());

        let moved = inbox.mark_submitted(&incoming.file).await.unwrap();
        assert_eq!(moved, inbox.dir().join("submitted/b.bin"));
        assert!(!path.exists() && moved.exists());
        // Started again, the gateway finds it unfinished until the outbox has its result.
        assert_eq!(inbox.unfinished_submissions(&outbox).unwrap(), vec![moved.clone()]);
        outbox.write_error("b", "b.bin", "failed").await.unwrap();
        assert!(inbox.unfinished_submissions(&outbox).unwrap().is_empty());
        // Marking a file already in submitted/ leaves it there.
        assert_eq!(inbox.mark_submitted(&BatchFile::new(moved.clone())).await.unwrap(), moved);
    }

    #[test]
    fn dot_files_and_folders_are_ignored() {
        let (_dir, inbox, _outbox) = setup();
        std::fs::write(inbox.dir().join(".batch_000001.bin"), b"being written").unwrap();
        std::fs::create_dir(inbox.dir().join("somedir")).unwrap();
        std::fs::write(inbox.dir().join("rejected/old.bin"), b"x").unwrap();
        let mut scanner = Scanner::new(&inbox, false);
        assert!(scanner.scan().unwrap().is_empty());
        assert!(scanner.scan().unwrap().is_empty());
    }

    #[test]
    fn a_file_is_taken_once_its_size_is_stable() {
        let (_dir, inbox, _outbox) = setup();
        let path = inbox.dir().join("b.bin");
        std::fs::write(&path, b"part").unwrap();
        let mut scanner = Scanner::new(&inbox, false);
        assert!(scanner.scan().unwrap().is_empty(), "first sighting");
        std::fs::write(&path, b"partly more").unwrap();
        assert!(scanner.scan().unwrap().is_empty(), "still growing");
        assert_eq!(scanner.scan().unwrap(), vec![path.clone()]);
        assert!(scanner.scan().unwrap().is_empty(), "returned once");
        // Moved away, then a new file of the same name arrives: it is taken again.
        std::fs::remove_file(&path).unwrap();
        assert!(scanner.scan().unwrap().is_empty());
        std::fs::write(&path, b"next").unwrap();
        assert!(scanner.scan().unwrap().is_empty());
        assert_eq!(scanner.scan().unwrap(), vec![path]);
        assert!(!scanner.once_done(), "never done when not --once");
    }

    #[test]
    fn once_takes_only_the_files_present_at_the_first_scan() {
        let (_dir, inbox, _outbox) = setup();
        let (a, b) = (inbox.dir().join("a.bin"), inbox.dir().join("b.bin"));
        std::fs::write(&a, b"a").unwrap();
        let mut scanner = Scanner::new(&inbox, true);
        assert!(scanner.scan().unwrap().is_empty());
        assert!(!scanner.once_done());
        std::fs::write(&b, b"b").unwrap();
        assert_eq!(scanner.scan().unwrap(), vec![a]);
        assert!(scanner.once_done());
        assert!(scanner.scan().unwrap().is_empty(), "b arrived after the first scan");
    }
}
