//! Every SQL statement of the scheduler. Each transition is one statement guarded by the
//! expected status and, for completions, the lease id (compare-and-set, DESIGN.md section 4).
//!
//! Readiness is a counter: each waiting job holds how many of its inputs are unfinished
//! (`jobs.unfinished_inputs`); the claim of a success counts it down in every job the success
//! feeds and queues those that reach 0 (`complete::CLAIM`; two inputs finishing at once
//! serialize on the waiting job's row, so exactly one of them queues it).

use proofmesh_core::{keys, BatchNumber, CircuitId, Geometry, ProtocolVersion};
use sqlx::PgPool;
use uuid::Uuid;

use crate::graph::{self, JobKind, NewJob};
use crate::state::Settings;

mod complete;
mod lease;
mod liveness;
mod operator;
mod progress;
mod quarantine;
mod submit;
mod versions;
pub use complete::*;
pub use lease::*;
pub use liveness::*;
pub use operator::*;
pub use progress::*;
pub use quarantine::*;
pub use submit::*;
pub use versions::*;

/// A connection of `pool` for one pass that must end within `deadline` (the dispatcher's, the
/// lease expiry's, a completion batch's, a renewal tick's): waits at most `deadline` for it.
/// Errors: none free within it, or the pool's own error.
pub async fn pass_connection(pool: &PgPool, deadline: std::time::Duration) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, DbError> {
    Ok(tokio::time::timeout(deadline, pool.acquire()).await.map_err(|_| DbError::pass_timed_out(deadline))??)
}

/// A pass on `conn` did not end within `deadline`: `conn` may be half-open (a partition, a
/// server gone without a reset), so it is closed here rather than given back to the pool, whose
/// release check (a ping) would wait on it for ever and hold a pool slot meanwhile (sqlx
/// `PoolConnection::return_to_pool`). Returns the pass's error ([`DbError::pass_timed_out`]).
pub fn abandon(conn: sqlx::pool::PoolConnection<sqlx::Postgres>, deadline: std::time::Duration) -> DbError {
    drop(conn.detach());
    DbError::pass_timed_out(deadline)
}

/// A database error, or a request the job state refuses.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    /// The report's lease is unknown, or its job already succeeded or failed through another lease.
    #[error("lease {0} is not current (stale or unknown): nothing recorded")]
    StaleLease(Uuid),
    /// A request the job state refuses (an unknown or retired protocol version ...): the reason.
    #[error("{0}")]
    Refused(String),
    /// What a request would create exists with other contents (a batch number submitted again
    /// with another file): the reason.
    #[error("{0}")]
    Conflict(String),
    /// Stored data that the scheduler cannot interpret.
    #[error("job state: {0}")]
    Invalid(String),
}

impl DbError {
    /// A pass over PostgreSQL that took longer than `deadline` (`Settings::db_pass_deadline`)
    /// and was given up (a transient error: the pass is tried again).
    pub fn pass_timed_out(deadline: std::time::Duration) -> DbError {
        let message = format!("no answer from PostgreSQL within {deadline:?}: the pass is given up and tried again");
        DbError::Sql(sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, message)))
    }

    /// Whether trying again cannot help: the statement failed on its data (SQLSTATE class 22,
    /// data exception, or 23, integrity constraint violation; PostgreSQL's appendix A), or the
    /// job state refused it. A report that fails so is answered `Refused` (issue 16 rule 8), not
    /// by ending the worker's stream, which would make it reconnect and send it again for ever.
    /// Connection errors, timeouts, serialization failures and deadlocks are transient: `false`.
    pub fn is_deterministic(&self) -> bool {
        match self {
            DbError::Sql(sqlx::Error::Database(e)) => e.code().is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
            DbError::Refused(_) | DbError::Conflict(_) | DbError::Invalid(_) => true,
            DbError::Sql(_) | DbError::StaleLease(_) => false,
        }
    }
}

/// Longest worker-supplied text (an error message) the job state keeps, bytes.
pub const MAX_REPORTED_TEXT: usize = 4096;

/// `text` as PostgreSQL can store it and an operator can read it: NUL (which a `text` value
/// cannot hold: SQLSTATE 22021) replaced by U+FFFD, and cut to [`MAX_REPORTED_TEXT`] bytes at a
/// character boundary, with a marker saying so.
pub fn storable_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_REPORTED_TEXT && !text.contains('\0') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut cut = MAX_REPORTED_TEXT.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = text[..cut].replace('\0', "\u{fffd}");
    if cut < text.len() {
        out.push_str(&format!(" [cut: {} bytes in all]", text.len()));
    }
    std::borrow::Cow::Owned(out)
}

/// What a job is: the identity columns every job query reads (flattened into its row type).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobIdentityRow {
    /// Batch number.
    pub batch_number: i64,
    /// `witness_generation`, `proving` or `compression`.
    pub kind: String,
    /// 0..=5.
    pub aggregation_round: i16,
    /// Circuit id.
    pub circuit_id: i16,
    /// Node depth.
    pub depth: i16,
    /// Sequence number.
    pub sequence_number: i32,
    /// Protocol version, minor.
    pub protocol_minor: i32,
    /// Protocol version, patch.
    pub protocol_patch: i32,
}

impl JobIdentityRow {
    /// As the API names a job.
    pub fn to_proto(&self) -> proofmesh_proto::v1::JobIdentity {
        proofmesh_proto::v1::JobIdentity {
            kind: JobKind::parse(&self.kind).map_or(0, |k| k.to_proto() as i32),
            batch_number: self.batch_number as u32,
            aggregation_round: self.aggregation_round as u32,
            circuit_id: self.circuit_id as u32,
            depth: self.depth as u32,
            sequence_number: self.sequence_number as u32,
        }
    }

    /// Its protocol version, as the API gives it.
    pub fn version(&self) -> proofmesh_proto::v1::ProtocolVersion {
        proto_version(self.protocol_minor, self.protocol_patch)
    }
}

/// A protocol version from its `protocol_minor`, `protocol_patch` columns, as the API gives it.
pub fn proto_version(minor: i32, patch: i32) -> proofmesh_proto::v1::ProtocolVersion {
    proofmesh_proto::v1::ProtocolVersion { minor: minor as u32, patch: patch as u32 }
}

/// What a job is, for metric labels.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct JobLabels {
    /// `jobs.kind`.
    pub kind: String,
    /// 0..=5.
    pub round: i16,
    /// Circuit id.
    pub circuit_id: i16,
}

/// Geometry as stored in `batches.geometry`.
pub fn geometry_to_row(g: &Geometry) -> Vec<i32> {
    vec![
        g.state_tree_depth.into(),
        g.tx_chunk.into(),
        g.vm_chunk.into(),
        g.storage_chunk.into(),
        g.leaf_fan_in.into(),
        g.node_fan_in.into(),
        g.max_node_depth.into(),
    ]
}

/// The inverse of [`geometry_to_row`]. Errors on a row of the wrong shape.
pub fn geometry_from_row(v: &[i32]) -> Result<Geometry, DbError> {
    let bad = || DbError::Invalid(format!("geometry {v:?}"));
    let [d, t, vm, s, l, n, m] = v else { return Err(bad()) };
    let u8_ = |x: &i32| u8::try_from(*x).map_err(|_| bad());
    let u16_ = |x: &i32| u16::try_from(*x).map_err(|_| bad());
    Ok(Geometry {
        state_tree_depth: u8_(d)?,
        tx_chunk: u16_(t)?,
        vm_chunk: u16_(vm)?,
        storage_chunk: u16_(s)?,
        leaf_fan_in: u8_(l)?,
        node_fan_in: u8_(n)?,
        max_node_depth: u8_(m)?,
    })
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_text_is_kept_storable_and_bounded() {
        assert!(matches!(storable_text("plain"), std::borrow::Cow::Borrowed("plain")));
        assert_eq!(storable_text("a\0b"), "a\u{fffd}b");
        let long = "é".repeat(MAX_REPORTED_TEXT);
        let cut = storable_text(&long);
        assert!(cut.len() < MAX_REPORTED_TEXT + 40, "{}", cut.len());
        assert!(cut.ends_with(&format!(" [cut: {} bytes in all]", long.len())), "{cut}");
        assert!(cut.starts_with("éé"));
    }
}
