//! The artifact store: where batches, circuit inputs and proofs live between jobs.
//!
//! Every artifact is written under a key fixed by the identity of the job that produces it
//! ([`keys`]), so a retried job overwrites the same key, and it is written whole before the job
//! reports completion (the local store writes a temporary file and renames it), so nothing ever
//! refers to a half-written artifact (DESIGN.md section 4).

use std::path::{Path, PathBuf};

use async_trait::async_trait;

/// Why an artifact could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// No artifact under this key.
    #[error("artifact `{key}` not found")]
    NotFound {
        /// The key asked for.
        key: String,
    },
    /// The key is not a relative path of `[A-Za-z0-9._-]` segments.
    #[error("invalid artifact key `{key}`")]
    InvalidKey {
        /// The key given.
        key: String,
    },
    /// The stored bytes do not match the checksum stored with them (a corrupted or truncated
    /// object): never handed to a job as if it were the artifact.
    #[error("artifact `{key}` is corrupted: {len} bytes with SHA-256 {actual}, stored with SHA-256 {expected}")]
    Corrupt {
        /// The key read.
        key: String,
        /// The checksum stored with the object (hex).
        expected: String,
        /// The checksum of the bytes read (hex).
        actual: String,
        /// How many bytes were read.
        len: usize,
    },
    /// The backend failed (disk, network).
    #[error("artifact `{key}`: {source}")]
    Io {
        /// The key being read or written.
        key: String,
        /// The backend's error.
        #[source]
        source: std::io::Error,
    },
}

/// Stores artifacts by key. Keys are `/`-separated relative paths (see [`keys`]).
///
/// Implementations: [`LocalStore`] (a directory; the default, and what every process of a
/// single-host cluster shares) and `proofmesh_artifacts::S3Store` (S3 and S3-compatible object
/// stores, GCS among them). Writes must be atomic: a reader sees the old bytes, the new
/// bytes, or nothing.
#[async_trait]
pub trait ArtifactStore: Send + Sync + std::fmt::Debug {
    /// Writes `bytes` under `key`, replacing what was there.
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), ArtifactError>;
    /// Reads the artifact under `key`. Errors: [`ArtifactError::NotFound`] if there is none.
    async fn get(&self, key: &str) -> Result<Vec<u8>, ArtifactError>;
    /// Deletes every artifact whose key starts with `prefix/` (e.g. [`keys::batch_prefix`]).
    /// Returns how many were deleted; none is not an error.
    async fn delete_prefix(&self, prefix: &str) -> Result<u64, ArtifactError>;
}

/// An artifact store in a local directory: key `a/b/c` is the file `<root>/a/b/c`.
///
/// Each file is the artifact behind a 36-byte header: [`LOCAL_MAGIC`] (4 bytes), then the
/// SHA-256 of the artifact (32 bytes). A read recomputes it and refuses a mismatch, a short
/// file or a file without the header (written by something else) with
/// [`ArtifactError::Corrupt`], as the S3 store does with its checksum metadata (issue 16 rule 2:
/// a damaged artifact is a lost one, never a bad input to a proof).
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// A store rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalStore { root: root.into() }
    }

    /// The directory the store writes under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, ArtifactError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

/// The first bytes of every file [`LocalStore`] writes (format version 1).
pub const LOCAL_MAGIC: [u8; 4] = *b"PMA1";

/// The header length of a [`LocalStore`] file: magic, then the SHA-256 of the artifact.
const LOCAL_HEADER: usize = 4 + 32;

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The artifact in a [`LocalStore`] file's bytes, its checksum checked. Errors:
/// [`ArtifactError::Corrupt`] (no header, or the artifact does not match it).
fn unwrap_local(key: &str, mut file: Vec<u8>) -> Result<Vec<u8>, ArtifactError> {
    let corrupt = |expected: String, body: &[u8]| ArtifactError::Corrupt {
        key: key.into(),
        expected,
        actual: hex(&sha256(body)),
        len: body.len(),
    };
    if file.len() < LOCAL_HEADER || file[..4] != LOCAL_MAGIC {
        return Err(corrupt("(no header: not written by this store)".into(), &file));
    }
    let expected: [u8; 32] = file[4..LOCAL_HEADER].try_into().expect("32 bytes");
    if sha256(&file[LOCAL_HEADER..]) != expected {
        return Err(corrupt(hex(&expected), &file[LOCAL_HEADER..]));
    }
    file.drain(..LOCAL_HEADER);
    Ok(file)
}

/// Checks that `key` is a relative path of non-empty `[A-Za-z0-9._-]` segments, none `.` or
/// `..`, so that no store can be made to write outside its root (directory or bucket prefix).
/// Errors: [`ArtifactError::InvalidKey`].
pub fn check_key(key: &str) -> Result<(), ArtifactError> {
    let valid = !key.is_empty()
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if valid {
        Ok(())
    } else {
        Err(ArtifactError::InvalidKey { key: key.into() })
    }
}

#[async_trait]
impl ArtifactStore for LocalStore {
    /// Durable before it returns (issue 16 rule 2: a write reported done survives a crash of
    /// the host): the bytes go to a unique temporary name, are synced (`fsync`), renamed over
    /// the key, and the directory holding it is synced, as is each directory this write created
    /// (its entry in its parent), so the name survives too.
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), ArtifactError> {
        let path = self.path(key)?;
        let owned_key = key.to_string();
        tokio::task::spawn_blocking(move || {
            let io = |source| ArtifactError::Io { key: owned_key.clone(), source };
            let dir = path.parent().ok_or_else(|| ArtifactError::InvalidKey { key: owned_key.clone() })?;
            // The directories this write creates, innermost first.
            let mut created = vec![];
            let mut missing = Some(dir);
            while let Some(d) = missing.filter(|d| !d.exists()) {
                created.push(d.to_path_buf());
                missing = d.parent();
            }
            std::fs::create_dir_all(dir).map_err(io)?;
            let tmp = temporary_path(&path);
            let mut file = std::fs::File::create(&tmp).map_err(io)?;
            std::io::Write::write_all(&mut file, &LOCAL_MAGIC).map_err(io)?;
            std::io::Write::write_all(&mut file, &sha256(&bytes)).map_err(io)?;
            std::io::Write::write_all(&mut file, &bytes).map_err(io)?;
            file.sync_all().map_err(io)?;
            drop(file);
            std::fs::rename(&tmp, &path).map_err(io)?;
            let sync_dir = |d: &std::path::Path| std::fs::File::open(d).and_then(|f| f.sync_all());
            sync_dir(dir).map_err(io)?;
            for d in &created {
                if let Some(parent) = d.parent() {
                    sync_dir(parent).map_err(io)?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| ArtifactError::Io { key: key.into(), source: std::io::Error::other(e) })?
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, ArtifactError> {
        let path = self.path(key)?;
        let file = tokio::fs::read(&path).await.map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ArtifactError::NotFound { key: key.into() }
            } else {
                ArtifactError::Io { key: key.into(), source }
            }
        })?;
        unwrap_local(key, file)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, ArtifactError> {
        let dir = self.path(prefix)?;
        let key = prefix.to_string();
        tokio::task::spawn_blocking(move || {
            let io = |source| ArtifactError::Io { key: key.clone(), source };
            let mut files = 0u64;
            let mut stack = vec![dir.clone()];
            while let Some(d) = stack.pop() {
                let entries = match std::fs::read_dir(&d) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io(e)),
                };
                for entry in entries {
                    let entry = entry.map_err(io)?;
                    if entry.file_type().map_err(io)?.is_dir() {
                        stack.push(entry.path());
                    } else {
                        files += 1;
                    }
                }
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(files),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
                Err(e) => Err(io(e)),
            }
        })
        .await
        .map_err(|e| ArtifactError::Io { key: prefix.into(), source: std::io::Error::other(e) })?
    }
}

/// A temporary file name beside `path` (`.<name>.tmp-<random>`), unique per writer even among
/// containers that share a volume and all run as pid 1: write there, then rename over `path`.
pub fn temporary_path(path: &std::path::Path) -> std::path::PathBuf {
    path.with_file_name(format!(
        ".{}.tmp-{:016x}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        rand::random::<u64>()
    ))
}

/// The artifact keys of a batch's jobs. One function per artifact kind, used by the scheduler
/// (which records them) and the workers (which read and write them).
pub mod keys {
    use crate::{AggregationRound, BatchNumber, CircuitId};

    /// Every artifact of a batch is under this prefix: `batches/000042`.
    pub fn batch_prefix(batch: BatchNumber) -> String {
        format!("batches/{:06}", batch.0)
    }

    /// The batch file as the gateway received it: `batches/000042/batch.bin`.
    pub fn batch_input(batch: BatchNumber) -> String {
        format!("batches/{:06}/batch.bin", batch.0)
    }

    /// The input of one circuit, written by witness generation:
    /// `batches/000042/r1-c2-d0/s3.input` (round 1, circuit id 2, depth 0, sequence number 3).
    pub fn circuit_input(batch: BatchNumber, round: AggregationRound, id: CircuitId, depth: u8, seq: u32) -> String {
        format!("batches/{:06}/r{}-c{}-d{}/s{}.input", batch.0, round as u8, id.0, depth, seq)
    }

    /// The proof of one circuit, written by its prover: `batches/000042/r1-c2-d0/s3.proof`.
    pub fn proof(batch: BatchNumber, round: AggregationRound, id: CircuitId, depth: u8, seq: u32) -> String {
        format!("batches/{:06}/r{}-c{}-d{}/s{}.proof", batch.0, round as u8, id.0, depth, seq)
    }

    /// The final (compressed) proof: `batches/000042/final.proof`.
    pub fn final_proof(batch: BatchNumber) -> String {
        format!("batches/{:06}/final.proof", batch.0)
    }

    /// A setup data file shared through the store (built once per cluster):
    /// `setup/v0.1-<geometry>-r<revision>/<circuit>.circuit` for `file` = the part after `setup/`.
    /// Never under `batches/`, so the house keeper never deletes it.
    pub fn setup_file(file: &str) -> String {
        format!("setup/{file}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn deleting_a_batch_prefix_removes_its_artifacts_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let (one, two) = (crate::BatchNumber(1), crate::BatchNumber(2));
        let r0 = crate::AggregationRound::BasicCircuits;
        store.put(&keys::batch_input(one), b"b".to_vec()).await.unwrap();
        store.put(&keys::proof(one, r0, crate::CircuitId(1), 0, 0), b"p".to_vec()).await.unwrap();
        store.put(&keys::final_proof(one), b"f".to_vec()).await.unwrap();
        store.put(&keys::batch_input(two), b"b2".to_vec()).await.unwrap();
        assert_eq!(store.delete_prefix(&keys::batch_prefix(one)).await.unwrap(), 3);
        assert!(matches!(store.get(&keys::final_proof(one)).await, Err(ArtifactError::NotFound { .. })));
        assert_eq!(store.get(&keys::batch_input(two)).await.unwrap(), b"b2");
        assert_eq!(store.delete_prefix(&keys::batch_prefix(one)).await.unwrap(), 0, "nothing left is not an error");
        assert!(matches!(store.delete_prefix("../x").await, Err(ArtifactError::InvalidKey { .. })));
    }

    #[tokio::test]
    async fn a_damaged_or_foreign_file_is_refused_as_corrupt_and_a_good_one_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let bytes = b"a proof of some length".to_vec();
        store.put("p", bytes.clone()).await.unwrap();
        assert_eq!(store.get("p").await.unwrap(), bytes);
        let file = dir.path().join("p");
        let stored = std::fs::read(&file).unwrap();
        assert_eq!(stored.len(), bytes.len() + LOCAL_HEADER);
        // One bit flipped in the artifact, the file truncated, a file written by something else.
        let mut flipped = stored.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let truncated = stored[..stored.len() - 3].to_vec();
        for (what, damaged) in [("flipped", flipped), ("truncated", truncated), ("foreign", bytes.clone()), ("empty", vec![])] {
            std::fs::write(&file, &damaged).unwrap();
            match store.get("p").await {
                Err(ArtifactError::Corrupt { key, .. }) => assert_eq!(key, "p", "{what}"),
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn put_then_get_and_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let key = keys::batch_input(crate::BatchNumber(7));
        assert!(matches!(store.get(&key).await, Err(ArtifactError::NotFound { .. })));
        store.put(&key, b"one".to_vec()).await.unwrap();
        store.put(&key, b"two".to_vec()).await.unwrap();
        assert_eq!(store.get(&key).await.unwrap(), b"two");
        // No temporary file is left beside it.
        let dir_entries = std::fs::read_dir(dir.path().join("batches/000007")).unwrap().count();
        assert_eq!(dir_entries, 1);
    }

    #[tokio::test]
    async fn keys_that_escape_the_root_are_refused() {
        let store = LocalStore::new("/nonexistent");
        for key in ["", "/etc/passwd", "../x", "a//b", "a/./b", "a b"] {
            assert!(matches!(store.get(key).await, Err(ArtifactError::InvalidKey { .. })), "{key}");
        }
    }
}
