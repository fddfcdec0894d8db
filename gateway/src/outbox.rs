//! The outbox: where results are handed back, one set of files per batch file, named after the
//! batch file's stem (`batch_000042.bin` -> `batch_000042.proof`, `.json` or `.error`).
//!
//! Every file is written whole to `.<name>.tmp` and renamed, so a reader that ignores dot-files
//! never sees a partial result. `.proof` is written before `.json`: once the `.json` is there,
//! the proof is too.

use std::io;
use std::path::{Path, PathBuf};

/// The outbox directory.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    dir: PathBuf,
}

impl Outbox {
    /// The outbox at `dir`, created if missing.
    pub(crate) fn create(dir: impl Into<PathBuf>) -> io::Result<Outbox> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Outbox { dir })
    }

    /// The directory results are written to.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of the result `<stem>.<ext>`.
    pub(crate) fn path(&self, stem: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{stem}.{ext}"))
    }

    /// True if the batch file with this stem already has a result (`.json` or `.error`): a
    /// restarted gateway does not watch it again.
    pub(crate) fn has_result(&self, stem: &str) -> bool {
        ["json", "error"].iter().any(|ext| self.path(stem, ext).exists())
    }

    /// Writes `<stem>.<ext>` atomically (temporary dot-file, then rename).
    pub(crate) async fn write(&self, stem: &str, ext: &str, bytes: impl AsRef<[u8]>) -> io::Result<PathBuf> {
        let path = self.path(stem, ext);
        let tmp = self.dir.join(format!(".{stem}.{ext}.tmp"));
        tokio::fs::write(&tmp, bytes).await?;
        tokio::fs::rename(&tmp, &path).await?;
        Ok(path)
    }

    /// Writes `<stem>.error`: one line naming the file, then `reason`.
    pub(crate) async fn write_error(&self, stem: &str, file: &str, reason: &str) -> io::Result<PathBuf> {
        self.write(stem, "error", format!("{file}: {reason}\n")).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::create(dir.path().join("out")).unwrap();
        assert!(!outbox.has_result("b"));
        outbox.write("b", "proof", b"one").await.unwrap();
        assert!(!outbox.has_result("b"), "a proof without its summary is not a result yet");
        outbox.write("b", "json", b"{}").await.unwrap();
        assert!(outbox.has_result("b"));
        let names: Vec<_> = std::fs::read_dir(outbox.dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
