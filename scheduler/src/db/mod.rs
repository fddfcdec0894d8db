//! Every SQL statement of the scheduler. Each transition is one statement guarded by the
//! expected status and, for completions, the lease id (compare-and-set, DESIGN.md section 4).
//!
//! Readiness is not a counter: a waiting job becomes queued in the transaction that records the
//! success of its last input, by checking that no input is still unfinished after locking the
//! waiting job's row (so two inputs finishing at once cannot both miss it).

use proofmesh_core::{keys, BatchNumber, CircuitId, Geometry, ProtocolVersion};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::graph::{self, JobKind, NewJob};
use crate::state::{Policy, Settings};

mod operator;
mod versions;
pub use operator::*;
pub use versions::*;

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

/// A job handed to a worker.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LeasedJob {
    /// `jobs.id`.
    pub id: i64,
    /// The lease (fencing token).
    pub lease_id: Uuid,
    /// What the job is.
    #[sqlx(flatten)]
    pub job: JobIdentityRow,
    /// The job's own input artifact, if any.
    pub input_key: Option<String>,
    /// The job's output artifact, if any.
    pub output_key: Option<String>,
    /// Lease deadline, Unix milliseconds.
    pub deadline_ms: i64,
    /// The batch's geometry (7 numbers).
    pub geometry: Vec<i32>,
    /// Seconds it waited in the queue.
    pub waited_secs: f64,
    /// Its weight (peak memory), MiB.
    pub weight_mib: i32,
}

/// What a job is, for metric labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobLabels {
    /// `jobs.kind`.
    pub kind: String,
    /// 0..=5.
    pub round: i16,
    /// Circuit id.
    pub circuit_id: i16,
}

/// What a successful completion changed.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    /// The job (empty labels when `already_recorded`).
    pub job: JobLabels,
    /// The batch.
    pub batch_number: i64,
    /// Jobs that became queued.
    pub queued: u64,
    /// The batch is now proven.
    pub batch_proven: bool,
    /// The report had been recorded before (a worker resends reports it saw no answer to): nothing changed.
    pub already_recorded: bool,
    /// A late result: the lease had expired and the job was leased again. That other lease is
    /// superseded (its holder gets a `Revoke`), with the connection that held it.
    pub superseded: Option<(Uuid, Option<String>)>,
}

/// A lease that ended without a success (failed, expired), and what became of its job.
#[derive(Debug, Clone)]
pub struct Ended {
    /// The lease.
    pub lease_id: Uuid,
    /// The job's batch.
    pub batch_number: i64,
    /// The job.
    pub job: JobLabels,
    /// The connection that held it (`jobs.leased_to`), to revoke it there.
    pub holder: Option<String>,
    /// The job failed for good (and with it the batch); otherwise it is queued again.
    pub job_failed: bool,
}

/// How a lease ends without success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The worker reported a failure.
    Failed,
    /// The worker gave it back unfinished (drain): queued again, the attempt does not count.
    HandedBack,
    /// Its deadline passed without a heartbeat.
    Expired,
}

/// Per-round progress of a batch.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RoundRow {
    /// 0..=5.
    pub aggregation_round: i16,
    /// Proving (or compression) jobs.
    pub total: i64,
    /// Succeeded.
    pub succeeded: i64,
    /// Failed.
    pub failed: i64,
    /// Leased now.
    pub in_progress: i64,
    /// Queued now.
    pub queued: i64,
}

/// A batch row with its progress.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BatchRow {
    /// Batch number.
    pub batch_number: i64,
    /// `proving`, `proven` or `failed`.
    pub status: String,
    /// Protocol version, minor.
    pub protocol_minor: i32,
    /// Protocol version, patch.
    pub protocol_patch: i32,
    /// The final proof's artifact key once proven.
    pub proof_key: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Unix milliseconds.
    pub created_ms: i64,
    /// Unix milliseconds, once proven or failed.
    pub finished_ms: Option<i64>,
    /// Sum of the compute seconds workers reported for its jobs.
    pub compute_secs: f64,
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

/// Refuses ([`DbError::Conflict`]) a resubmission of `batch` whose contents' hash differs from
/// the one recorded when it was created; a batch recorded without one, or a request without
/// one, is not checked.
async fn check_contents(tx: &mut sqlx::PgConnection, batch: BatchNumber, content: Option<&[u8]>) -> Result<(), DbError> {
    let Some(content) = content else { return Ok(()) };
    let recorded: Option<Vec<u8>> = sqlx::query_scalar("SELECT content_sha256 FROM batches WHERE batch_number = $1")
        .bind(i64::from(batch.0))
        .fetch_optional(&mut *tx)
        .await?
        .flatten();
    match recorded {
        Some(recorded) if recorded != content => Err(DbError::Conflict(format!(
            "batch {batch} was submitted before with other contents (SHA-256 {} there, {} now): batch numbers must be unique",
            hex(&recorded),
            hex(content)
        ))),
        _ => Ok(()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A batch as `Batches.SubmitBatch` asks for it.
#[derive(Debug, Clone, Copy)]
pub struct NewBatch<'a> {
    /// Its number.
    pub number: BatchNumber,
    /// The protocol version it is proven under.
    pub version: ProtocolVersion,
    /// Artifact key of its file ([`proofmesh_core::keys::batch_input`]).
    pub input_key: &'a str,
    /// SHA-256 of its file (32 bytes), recorded when created; `None`: not recorded or checked.
    pub content_sha256: Option<&'a [u8]>,
    /// Its priority (higher first).
    pub priority: i32,
}

/// Inserts a batch and its round-0 witness-generation job (queued), proven at `geometry`.
/// Idempotent: returns `false` and changes nothing if the batch exists. Errors:
/// [`DbError::Refused`] when its version is not an active version of the `protocol_versions`
/// table (unknown, or retired); [`DbError::Conflict`] when it exists with another recorded
/// content hash.
pub async fn submit_batch(pool: &PgPool, new: &NewBatch<'_>, geometry: &Geometry, settings: &Settings) -> Result<bool, DbError> {
    let NewBatch { number: batch, version, input_key, content_sha256, priority } = *new;
    let mut tx = pool.begin().await?;
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM protocol_versions WHERE minor = $1 AND patch = $2")
        .bind(i32::from(version.minor))
        .bind(i32::from(version.patch))
        .fetch_optional(&mut *tx)
        .await?;
    if status.as_deref() != Some("active") {
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM batches WHERE batch_number = $1)")
            .bind(i64::from(batch.0))
            .fetch_one(&mut *tx)
            .await?;
        if exists {
            check_contents(&mut tx, batch, content_sha256).await?;
            return Ok(false);
        }
        return Err(DbError::Refused(match status {
            None => format!(
                "protocol version {version} is not registered (register it with Admin.RegisterProtocolVersion)"
            ),
            Some(_) => format!("protocol version {version} is retired: new batches of it are refused"),
        }));
    }
    let created = sqlx::query(
        "INSERT INTO batches (batch_number, protocol_minor, protocol_patch, geometry, status, input_key, priority, content_sha256)
         VALUES ($1, $2, $3, $4, 'proving', $5, $6, $7) ON CONFLICT (batch_number) DO NOTHING",
    )
    .bind(i64::from(batch.0))
    .bind(i32::from(version.minor))
    .bind(i32::from(version.patch))
    .bind(geometry_to_row(geometry))
    .bind(input_key)
    .bind(priority)
    .bind(content_sha256)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if created {
        sqlx::query(
            "INSERT INTO jobs (batch_number, kind, aggregation_round, circuit_id, status, max_attempts, priority,
                               protocol_minor, protocol_patch, input_key, queued_at, urgency)
             VALUES ($1, 'witness_generation', 0, 0, 'queued', $2, $3, $4, $5, $6, now(),
                     $3 * $7 - extract(epoch FROM now())::float8)",
        )
        .bind(i64::from(batch.0))
        .bind(settings.max_attempts.of(JobKind::WitnessGeneration))
        .bind(priority)
        .bind(i32::from(version.minor))
        .bind(i32::from(version.patch))
        .bind(input_key)
        .bind(settings.policy.ageing_secs)
        .execute(&mut *tx)
        .await?;
    } else {
        check_contents(&mut tx, batch, content_sha256).await?;
    }
    tx.commit().await?;
    Ok(created)
}

/// What the dispatcher asks [`lease`] for: one worker (a WVG together with the prover matched with
/// it), and the reserve setting (docs/scheduling.md).
#[derive(Debug, Clone)]
pub struct LeaseAsk<'a> {
    /// The job kind its role takes.
    pub kind: JobKind,
    /// The worker the lease goes to (`jobs.leased_to`).
    pub worker: &'a str,
    /// Packed protocol versions (`minor << 16 | patch`) it proves; empty: all.
    pub versions: &'a [i32],
    /// Packed `(aggregation_round, circuit_id)` pairs (`round << 8 | circuit_id`) it takes (its
    /// prover group, intersected with its prover's); empty: all.
    pub pairs: &'a [i32],
    /// Lease lifetime, seconds.
    pub lease_secs: f64,
    /// Packed pairs whose setup data is loaded where the job will be proven (the prover matched
    /// with a WVG, or the worker itself); preferred among equally urgent jobs.
    pub warm: &'a [i32],
    /// A WVG's own loaded setups: the next tie-break.
    pub warm_own: &'a [i32],
    /// The worker's memory budget, MiB; 0: none.
    pub budget_mib: i64,
    /// The matched prover's memory budget, MiB; 0: none (or no prover).
    pub prover_budget_mib: i64,
    /// The leases holding the matched prover's slots (their weights use its budget).
    pub prover_leases: &'a [Uuid],
    /// A job that has waited this long (seconds) and does not fit the free budget stops lighter
    /// jobs behind it from being leased to this worker, until enough memory is free.
    pub reserve_after_secs: f64,
    /// The worker's certificate identity (TLS on): the lease is bound to it.
    pub identity: Option<&'a str>,
    /// The matched prover's certificate identity: it may take the lease over and complete it.
    pub prover_identity: Option<&'a str>,
}

impl<'a> LeaseAsk<'a> {
    /// An ask for a worker that declares nothing (every version and pair, no setups loaded, no
    /// budget), under `policy`.
    pub fn plain(kind: JobKind, worker: &'a str, lease_secs: f64, policy: &Policy) -> Self {
        LeaseAsk {
            kind,
            worker,
            versions: &[],
            pairs: &[],
            lease_secs,
            warm: &[],
            warm_own: &[],
            budget_mib: 0,
            prover_budget_mib: 0,
            prover_leases: &[],
            reserve_after_secs: policy.reserve_after_secs,
            identity: None,
            prover_identity: None,
        }
    }
}

/// How many of the most urgent eligible jobs one lease statement considers: the memory-budget rule
/// looks no further (a worker none of them fits waits for memory), which bounds the statement's
/// cost however long the queue is.
pub const LEASE_WINDOW: i64 = 64;

/// The lease order (docs/scheduling.md rule 2): `jobs.urgency` is the batch's priority times
/// `ageing_secs` minus its submission time (seconds), so ordering by it is ordering by priority
/// plus one point per `ageing_secs` waited. The window of candidates is read in the
/// `jobs_lease_order` index's order ([`INDEX_ORDER`]); setup-data affinity then orders within it.
const LEASE_ORDER: &str = "urgency DESC, batch_number, aggregation_round DESC, warm DESC, warm_own DESC, id";
const INDEX_ORDER: &str = "urgency DESC, batch_number, aggregation_round DESC, id";

/// The lease statement for a worker that declares versions (`versions`) or prover-group pairs
/// (`pairs`) or neither: four texts, so a worker that declares neither has no filter that would
/// make PostgreSQL's generic plan misjudge the queue as tiny and sort all of it instead of
/// reading the index in order. Parameters not filtered on are still referenced (a constant test).
fn lease_sql(versions: bool, pairs: bool) -> String {
    let versions = if versions {
        "(j.protocol_minor * 65536 + j.protocol_patch) = ANY($4::int[])"
    } else {
        "cardinality($4::int[]) >= 0"
    };
    let pairs = if pairs { "(j.aggregation_round * 256 + j.circuit_id) = ANY($6::int[])" } else { "cardinality($6::int[]) >= 0" };
    format!(
        "WITH budget AS (
             SELECT LEAST(NULLIF($7::bigint, 0), NULLIF($8::bigint, 0)) AS total,
                    LEAST(CASE WHEN $7 > 0 THEN $7 - (SELECT COALESCE(sum(weight_mib), 0) FROM jobs
                                                       WHERE status = 'leased' AND leased_to = $2) END,
                          CASE WHEN $8 > 0 THEN $8 - (SELECT COALESCE(sum(weight_mib), 0) FROM jobs
                                                       WHERE status = 'leased' AND lease_id = ANY($9)) END) AS free),
         candidates AS (
             SELECT j.id, j.weight_mib, j.urgency, j.batch_number, j.aggregation_round,
                    (j.aggregation_round * 256 + j.circuit_id) = ANY($10) AS warm,
                    (j.aggregation_round * 256 + j.circuit_id) = ANY($11) AS warm_own,
                    j.queued_at < now() - make_interval(secs => $12) AS overdue
             FROM jobs j
             WHERE j.status = 'queued' AND j.kind = $3 AND {versions} AND {pairs}
               AND j.weight_mib <= COALESCE((SELECT total FROM budget), j.weight_mib)
             ORDER BY {INDEX_ORDER} LIMIT {LEASE_WINDOW}),
         ranked AS (
             SELECT c.*, c.weight_mib <= COALESCE(budget.free, c.weight_mib) AS fits,
                    COALESCE(bool_or(c.overdue AND c.weight_mib > budget.free)
                             OVER (ORDER BY {LEASE_ORDER} ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), false) AS held_back
             FROM candidates c, budget),
         picked AS (
             UPDATE jobs SET status = 'leased', lease_id = $1, leased_to = $2, attempts = attempts + 1,
                    lease_deadline = now() + make_interval(secs => $5), leased_at = now()
             WHERE status = 'queued'
               AND id = (SELECT id FROM ranked WHERE fits AND NOT held_back ORDER BY {LEASE_ORDER} LIMIT 1)
             RETURNING *),
         history AS (INSERT INTO leases (lease_id, job_id, worker, identity, prover_identity)
                     SELECT lease_id, id, leased_to, $13, $14 FROM picked)
         SELECT p.id, p.lease_id, p.batch_number, p.kind, p.aggregation_round, p.circuit_id, p.depth,
                p.sequence_number, p.protocol_minor, p.protocol_patch, p.input_key, p.output_key,
                (extract(epoch FROM p.lease_deadline) * 1000)::bigint AS deadline_ms, b.geometry,
                COALESCE(extract(epoch FROM now() - p.queued_at), 0)::float8 AS waited_secs, p.weight_mib
         FROM picked p JOIN batches b USING (batch_number)"
    )
}

/// Leases the most urgent queued job that `ask`'s worker can take, in one statement. Eligible:
/// status queued, the worker's kind, versions and pairs, and a weight within its whole budget.
/// Among the [`LEASE_WINDOW`] most urgent eligible jobs ([`INDEX_ORDER`]), the first in
/// [`LEASE_ORDER`] (setup-data affinity breaking ties within a batch's round) whose weight
/// fits the free budget is leased, unless a job before it has waited past `reserve_after_secs`
/// and does not fit: then nothing, so memory frees up for it. Returns `None` when nothing is
/// leasable for it.
pub async fn lease(pool: &PgPool, ask: &LeaseAsk<'_>) -> Result<Option<LeasedJob>, DbError> {
    static SQL: std::sync::LazyLock<[String; 4]> = std::sync::LazyLock::new(|| {
        [lease_sql(false, false), lease_sql(true, false), lease_sql(false, true), lease_sql(true, true)]
    });
    let sql = &SQL[usize::from(!ask.versions.is_empty()) + 2 * usize::from(!ask.pairs.is_empty())];
    let job = sqlx::query_as::<_, LeasedJob>(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(Uuid::new_v4())
        .bind(ask.worker)
        .bind(ask.kind.as_str())
        .bind(ask.versions)
        .bind(ask.lease_secs)
        .bind(ask.pairs)
        .bind(ask.budget_mib)
        .bind(ask.prover_budget_mib)
        .bind(ask.prover_leases)
        .bind(ask.warm)
        .bind(ask.warm_own)
        .bind(ask.reserve_after_secs)
        .bind(ask.identity)
        .bind(ask.prover_identity)
        .fetch_optional(pool)
        .await?;
    Ok(job)
}

/// Recomputes the lease order key (`jobs.urgency`) of every unfinished job for `ageing_secs`: the
/// scheduler does this when it starts, so a changed `--priority-ageing-secs` applies to the queue.
pub async fn rerank(pool: &PgPool, ageing_secs: f64) -> Result<u64, DbError> {
    Ok(sqlx::query(
        "UPDATE jobs j SET urgency = j.priority * $1 - extract(epoch FROM b.created_at)::float8
         FROM batches b WHERE b.batch_number = j.batch_number AND j.status IN ('waiting', 'queued', 'leased')",
    )
    .bind(ageing_secs)
    .execute(pool)
    .await?
    .rows_affected())
}

/// The output keys and depths of a job's inputs, in input order.
pub async fn input_artifacts(pool: &PgPool, job_id: i64) -> Result<Vec<(String, i16)>, DbError> {
    let rows = sqlx::query_as::<_, (Option<String>, i16)>(
        "SELECT i.output_key, i.depth FROM job_inputs ji JOIN jobs i ON i.id = ji.input_job_id
         WHERE ji.job_id = $1 ORDER BY ji.position",
    )
    .bind(job_id)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(k, d)| Ok((k.ok_or_else(|| DbError::Invalid(format!("an input of job {job_id} has no output")))?, d)))
        .collect()
}

/// Puts a lease that never reached its worker back in the queue, without counting the attempt.
pub async fn unlease(pool: &PgPool, lease_id: Uuid) -> Result<(), DbError> {
    sqlx::query(
        "WITH j AS (UPDATE jobs SET status = 'queued', lease_id = NULL, leased_to = NULL, lease_deadline = NULL,
                                    attempts = attempts - 1, queued_at = now()
                    WHERE lease_id = $1 AND status = 'leased' RETURNING id)
         UPDATE leases SET outcome = 'unsent', ended_at = now() WHERE lease_id = $1 AND outcome IS NULL",
    )
    .bind(lease_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// A worker's stream ended: the leases attached to it get at most `grace_secs` more to be
/// re-attached by a reconnecting worker (`Register.held_leases`, heartbeats); after that they
/// expire like any other. Returns how many leases it held.
pub async fn detach_worker(pool: &PgPool, worker: &str, grace_secs: f64) -> Result<u64, DbError> {
    let n = sqlx::query(
        "UPDATE jobs SET lease_deadline = least(lease_deadline, now() + make_interval(secs => $2))
         WHERE leased_to = $1 AND status = 'leased'",
    )
    .bind(worker)
    .bind(grace_secs)
    .execute(pool)
    .await?
    .rows_affected();
    sqlx::query("UPDATE workers SET disconnected_at = now() WHERE id = $1").bind(worker).execute(pool).await?;
    Ok(n)
}

/// Renews `leases` for the connection `worker`: each current one gets the deadline now +
/// `lease_secs`. It is also attached to `worker` when `take_over` (a prover taking over the
/// lease of a witness vector it accepted) or when its holder is not among `connected` (a
/// reconnected worker re-attaching its leases); a live holder otherwise keeps it, so a WVG's
/// last heartbeat cannot take a lease back from the prover it handed it to. Returns the leases
/// that are not current (stale: expired and leased again, or finished), for the caller to revoke.
pub async fn renew(
    pool: &PgPool,
    worker: &str,
    leases: &[Uuid],
    lease_secs: f64,
    take_over: bool,
    connected: &[String],
) -> Result<Vec<Uuid>, DbError> {
    let renewed: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE jobs SET lease_deadline = now() + make_interval(secs => $3),
                         leased_to = CASE WHEN $4 OR leased_to IS NULL OR NOT (leased_to = ANY($5)) THEN $1 ELSE leased_to END
         WHERE lease_id = ANY($2) AND status = 'leased'
         RETURNING lease_id",
    )
    .bind(worker)
    .bind(leases)
    .bind(lease_secs)
    .bind(take_over)
    .bind(connected)
    .fetch_all(pool)
    .await?;
    sqlx::query("UPDATE workers SET last_seen = now() WHERE id = $1").bind(worker).execute(pool).await?;
    Ok(leases.iter().copied().filter(|l| !renewed.contains(l)).collect())
}

/// The leases whose deadline has passed.
pub async fn due_leases(pool: &PgPool) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar("SELECT lease_id FROM jobs WHERE status = 'leased' AND lease_deadline <= now()")
        .fetch_all(pool)
        .await?)
}

/// Seconds until the earliest lease deadline (negative if one has passed), or `None` when no
/// job is leased.
pub async fn next_deadline_secs(pool: &PgPool) -> Result<Option<f64>, DbError> {
    Ok(sqlx::query_scalar(
        "SELECT extract(epoch FROM min(lease_deadline) - now())::float8 FROM jobs WHERE status = 'leased'",
    )
    .fetch_one(pool)
    .await?)
}

/// The job row a result claims: its current lease or, for a late result, an earlier one.
struct Claim {
    id: i64,
    batch: i64,
    kind: String,
    round: i16,
    circuit_id: i16,
    priority: i32,
    minor: i32,
    patch: i32,
    output_key: Option<String>,
    superseded: Option<(Uuid, Option<String>)>,
}

/// Marks the job of `lease` succeeded, if no other lease of it did. The current lease is the
/// common case. A late result (its lease expired and the job was queued or leased again) is
/// accepted too, once: the first valid result wins and the newer lease is superseded.
/// `Ok(None)`: this lease's success was recorded before.
async fn claim_success(
    tx: &mut Transaction<'_, Postgres>,
    lease: Uuid,
    compute_secs: f64,
) -> Result<Option<Claim>, DbError> {
    let outcome: Option<(i64, Option<String>)> =
        sqlx::query_as("SELECT job_id, outcome FROM leases WHERE lease_id = $1").bind(lease).fetch_optional(&mut **tx).await?;
    let Some((job, outcome)) = outcome else { return Err(DbError::StaleLease(lease)) };
    match outcome.as_deref() {
        Some("succeeded") => return Ok(None),
        None | Some("expired") => {}
        // It failed (reported by its worker) or was never sent: no result can come from it.
        Some(_) => return Err(DbError::StaleLease(lease)),
    }
    // Lock the job; it must still be unfinished.
    let row = sqlx::query_as::<_, (String, Option<Uuid>, Option<String>)>(
        "SELECT status, lease_id, leased_to FROM jobs WHERE id = $1 FOR UPDATE",
    )
    .bind(job)
    .fetch_one(&mut **tx)
    .await?;
    let (status, current, holder) = row;
    if status != "queued" && status != "leased" {
        return Err(DbError::StaleLease(lease));
    }
    let superseded = current.filter(|c| *c != lease).map(|c| (c, holder));
    if let Some((other, _)) = &superseded {
        sqlx::query("UPDATE leases SET outcome = 'superseded', ended_at = now() WHERE lease_id = $1 AND outcome IS NULL")
            .bind(other)
            .execute(&mut **tx)
            .await?;
    }
    sqlx::query("UPDATE leases SET outcome = 'succeeded', ended_at = now() WHERE lease_id = $1")
        .bind(lease)
        .execute(&mut **tx)
        .await?;
    let (id, batch, kind, round, circuit_id, priority, minor, patch, output_key) =
        sqlx::query_as::<_, (i64, i64, String, i16, i16, i32, i32, i32, Option<String>)>(
            "UPDATE jobs SET status = 'succeeded', finished_at = now(), compute_secs = $2, lease_id = $3,
                             lease_deadline = NULL, error = NULL
             WHERE id = $1
             RETURNING id, batch_number, kind, aggregation_round, circuit_id, priority, protocol_minor, protocol_patch, output_key",
        )
        .bind(job)
        .bind(compute_secs)
        .bind(lease)
        .fetch_one(&mut **tx)
        .await?;
    Ok(Some(Claim { id, batch, kind, round, circuit_id, priority, minor, patch, output_key, superseded }))
}

/// Records a completion: the first valid result of a job wins (see `claim_success`); refused with
/// [`DbError::StaleLease`] when the lease is unknown, failed, or its job already finished through
/// another lease. A round-0 witness generation inserts the batch's job graph from `counts`; every
/// completion queues the waiting jobs whose inputs are now all done; compression marks the batch
/// proven. One transaction; recording the same lease twice changes nothing the second time.
pub async fn complete(
    pool: &PgPool,
    lease: Uuid,
    counts: &[(CircuitId, u32)],
    compute_secs: f64,
    settings: &Settings,
) -> Result<Completion, DbError> {
    let mut tx = pool.begin().await?;
    let Some(claim) = claim_success(&mut tx, lease, compute_secs).await? else {
        return Ok(Completion { already_recorded: true, ..Completion::default() });
    };
    let Claim { id, batch, kind: kind_name, round, circuit_id, priority, minor, patch, output_key, superseded } = claim;
    let kind = JobKind::parse(&kind_name).ok_or_else(|| DbError::Invalid(format!("job {id} kind {kind_name}")))?;
    let job = JobLabels { kind: kind_name, round, circuit_id };
    let mut done = Completion { batch_number: batch, job, superseded, ..Completion::default() };
    match (kind, round) {
        (JobKind::WitnessGeneration, 0) => {
            let geometry: Vec<i32> = sqlx::query_scalar("SELECT geometry FROM batches WHERE batch_number = $1")
                .bind(batch)
                .fetch_one(&mut *tx)
                .await?;
            let g = geometry_from_row(&geometry)?;
            let batch_no = BatchNumber(u32::try_from(batch).map_err(|_| DbError::Invalid(format!("batch {batch}")))?);
            match graph::plan(batch_no, &g, counts) {
                Ok(jobs) => {
                    done.queued = insert_graph(&mut tx, batch, &jobs, settings, (priority, minor, patch)).await?;
                }
                Err(e) => {
                    fail_batch(&mut tx, batch, &format!("round-0 witness generation: {e}")).await?;
                }
            }
        }
        (JobKind::Compression, _) => {
            sqlx::query(
                "UPDATE batches SET status = 'proven', proof_key = $2, finished_at = now()
                 WHERE batch_number = $1 AND status = 'proving'",
            )
            .bind(batch)
            .bind(output_key.unwrap_or_else(|| keys::final_proof(BatchNumber(batch as u32))))
            .execute(&mut *tx)
            .await?;
            done.batch_proven = true;
        }
        _ => {}
    }
    done.queued += queue_ready_dependents(&mut tx, id).await?;
    tx.commit().await?;
    Ok(done)
}

/// Inserts the job graph; jobs with no inputs are queued at once. Returns how many were queued.
async fn insert_graph(
    tx: &mut Transaction<'_, Postgres>,
    batch: i64,
    jobs: &[NewJob],
    settings: &Settings,
    (priority, minor, patch): (i32, i32, i32),
) -> Result<u64, DbError> {
    let mut ids = Vec::with_capacity(jobs.len());
    let mut queued = 0;
    for job in jobs {
        let ready = job.inputs.is_empty();
        queued += u64::from(ready);
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO jobs (batch_number, kind, aggregation_round, circuit_id, depth, sequence_number, status,
                               max_attempts, priority, protocol_minor, protocol_patch, input_key, output_key, queued_at,
                               weight_mib, urgency)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, CASE WHEN $7 = 'queued' THEN now() END, $14,
                     $9 * $15 - (SELECT extract(epoch FROM created_at)::float8 FROM batches WHERE batch_number = $1))
             RETURNING id",
        )
        .bind(batch)
        .bind(job.kind.as_str())
        .bind(i16::from(job.round))
        .bind(i16::from(job.circuit_id))
        .bind(i16::from(job.depth))
        .bind(job.sequence_number as i32)
        .bind(if ready { "queued" } else { "waiting" })
        .bind(settings.max_attempts.of(job.kind))
        .bind(priority)
        .bind(minor)
        .bind(patch)
        .bind(&job.input_key)
        .bind(&job.output_key)
        .bind(settings.policy.job_weights.of(job.kind, job.round, job.circuit_id))
        .bind(settings.policy.ageing_secs)
        .fetch_one(&mut **tx)
        .await?;
        ids.push(id);
        for (position, &input) in job.inputs.iter().enumerate() {
            sqlx::query("INSERT INTO job_inputs (job_id, input_job_id, position) VALUES ($1, $2, $3)")
                .bind(id)
                .bind(ids[input])
                .bind(position as i32)
                .execute(&mut **tx)
                .await?;
        }
    }
    Ok(queued)
}

/// Queues the waiting jobs fed by `input` whose inputs have all succeeded. The waiting rows are
/// locked first; the check runs in a later statement, so it sees any input that another
/// transaction completed while this one waited for the lock.
async fn queue_ready_dependents(tx: &mut Transaction<'_, Postgres>, input: i64) -> Result<u64, DbError> {
    let dependents: Vec<i64> = sqlx::query_scalar(
        "SELECT j.id FROM jobs j JOIN job_inputs ji ON ji.job_id = j.id
         WHERE ji.input_job_id = $1 AND j.status = 'waiting' ORDER BY j.id FOR UPDATE OF j",
    )
    .bind(input)
    .fetch_all(&mut **tx)
    .await?;
    if dependents.is_empty() {
        return Ok(0);
    }
    let n = sqlx::query(
        "UPDATE jobs SET status = 'queued', queued_at = now()
         WHERE id = ANY($1) AND status = 'waiting'
           AND NOT EXISTS (SELECT 1 FROM job_inputs ji JOIN jobs i ON i.id = ji.input_job_id
                           WHERE ji.job_id = jobs.id AND i.status <> 'succeeded')",
    )
    .bind(&dependents)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n)
}

/// Ends `lease` without success: a failure its worker reported, or an expired deadline (for
/// [`EndReason::Expired`] only if the deadline has indeed passed: a heartbeat may have won the
/// race). A retryable end under the job's `max_attempts` queues the job again; otherwise the job
/// fails with `error` and so does its batch (its unfinished jobs stop; the batch's error names
/// the job, the attempts and the last error). Refused with [`DbError::StaleLease`] unless `lease`
/// is current; `Ok(None)` when this failure was recorded before.
pub async fn end_lease(
    pool: &PgPool,
    lease: Uuid,
    error: &str,
    retryable: bool,
    reason: EndReason,
) -> Result<Option<Ended>, DbError> {
    let mut tx = pool.begin().await?;
    let expired = reason == EndReason::Expired;
    let handed_back = reason == EndReason::HandedBack;
    let row = sqlx::query_as::<_, (i64, String, Option<String>, String, i16, i16, i16, i32, i32)>(
        "WITH old AS (SELECT id, leased_to FROM jobs WHERE lease_id = $1 AND status = 'leased' FOR UPDATE)
         UPDATE jobs SET
             attempts = CASE WHEN $5 THEN attempts - 1 ELSE attempts END,
             status = CASE WHEN $5 OR ($3 AND attempts < max_attempts) THEN 'queued' ELSE 'failed' END,
             queued_at = now(), lease_id = NULL, leased_to = NULL, lease_deadline = NULL, error = $2,
             finished_at = CASE WHEN $5 OR ($3 AND attempts < max_attempts) THEN NULL ELSE now() END
         FROM old
         WHERE jobs.id = old.id AND (NOT $4 OR jobs.lease_deadline <= now())
         RETURNING jobs.batch_number, jobs.status, old.leased_to, jobs.kind, jobs.aggregation_round, jobs.circuit_id,
                   jobs.depth, jobs.sequence_number, jobs.attempts",
    )
    .bind(lease)
    .bind(error)
    .bind(retryable)
    .bind(expired)
    .bind(handed_back)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((batch, status, holder, kind, round, circuit, depth, seq, attempts)) = row else {
        let outcome: Option<Option<String>> =
            sqlx::query_scalar("SELECT outcome FROM leases WHERE lease_id = $1").bind(lease).fetch_optional(&mut *tx).await?;
        return match outcome {
            Some(Some(o)) if o == "failed" && !expired => Ok(None),
            _ => Err(DbError::StaleLease(lease)),
        };
    };
    sqlx::query("UPDATE leases SET outcome = $2, ended_at = now(), error = $3 WHERE lease_id = $1")
        .bind(lease)
        .bind(if expired { "expired" } else { "failed" })
        .bind(error)
        .execute(&mut *tx)
        .await?;
    let job_failed = status == "failed";
    if job_failed {
        let what = format!(
            "{kind} job (round {round}, circuit {circuit}, depth {depth}, seq {seq}) failed after {attempts} attempt(s): {error}"
        );
        fail_batch(&mut tx, batch, &what).await?;
    }
    tx.commit().await?;
    let job = JobLabels { kind, round, circuit_id: circuit };
    Ok(Some(Ended { lease_id: lease, batch_number: batch, job, holder, job_failed }))
}

/// Fails a proving batch with `error`; its waiting and queued jobs fail too (leased ones finish
/// or expire, and their results are refused).
async fn fail_batch(tx: &mut Transaction<'_, Postgres>, batch: i64, error: &str) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE batches SET status = 'failed', error = $2, finished_at = now()
         WHERE batch_number = $1 AND status = 'proving'",
    )
    .bind(batch)
    .bind(error)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE jobs SET status = 'failed', error = 'batch failed', finished_at = now()
         WHERE batch_number = $1 AND status IN ('waiting', 'queued')",
    )
    .bind(batch)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

const BATCH_COLUMNS: &str = "b.batch_number, b.status, b.protocol_minor, b.protocol_patch, b.proof_key, b.error,
     (extract(epoch FROM b.created_at) * 1000)::bigint AS created_ms,
     (extract(epoch FROM b.finished_at) * 1000)::bigint AS finished_ms,
     COALESCE((SELECT sum(compute_secs) FROM jobs j WHERE j.batch_number = b.batch_number), 0)::float8 AS compute_secs";

/// One batch, or `None`.
pub async fn batch(pool: &PgPool, batch: i64) -> Result<Option<BatchRow>, DbError> {
    let sql = format!("SELECT {BATCH_COLUMNS} FROM batches b WHERE b.batch_number = $1");
    Ok(sqlx::query_as::<_, BatchRow>(sqlx::AssertSqlSafe(sql)).bind(batch).fetch_optional(pool).await?)
}

/// The newest `limit` batches, newest first.
pub async fn batches(pool: &PgPool, limit: i64) -> Result<Vec<BatchRow>, DbError> {
    let sql = format!("SELECT {BATCH_COLUMNS} FROM batches b ORDER BY b.batch_number DESC LIMIT $1");
    Ok(sqlx::query_as::<_, BatchRow>(sqlx::AssertSqlSafe(sql)).bind(limit).fetch_all(pool).await?)
}

/// Proving and compression jobs of a batch by round.
pub async fn rounds(pool: &PgPool, batch: i64) -> Result<Vec<RoundRow>, DbError> {
    Ok(sqlx::query_as::<_, RoundRow>(
        "SELECT aggregation_round, count(*) AS total,
                count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                count(*) FILTER (WHERE status = 'failed') AS failed,
                count(*) FILTER (WHERE status = 'leased') AS in_progress,
                count(*) FILTER (WHERE status = 'queued') AS queued
         FROM jobs WHERE batch_number = $1 AND kind <> 'witness_generation'
         GROUP BY aggregation_round ORDER BY aggregation_round",
    )
    .bind(batch)
    .fetch_all(pool)
    .await?)
}

/// Records a worker's registration.
#[allow(clippy::too_many_arguments)]
pub async fn register_worker(
    pool: &PgPool,
    id: &str,
    name: &str,
    role: &str,
    zone: &str,
    region: &str,
    host: &str,
    capacity: u32,
    prover_endpoint: Option<&str>,
    identity: Option<&str>,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO workers (id, name, role, zone, region, host, capacity, prover_endpoint, identity)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id)
    .bind(name)
    .bind(role)
    .bind(zone)
    .bind(region)
    .bind(host)
    .bind(capacity as i32)
    .bind(prover_endpoint)
    .bind(identity)
    .execute(pool)
    .await?;
    Ok(())
}

/// The leases among `leases` that `identity` may not present: bound (TLS on) to the
/// certificate identities of other workers. A lease granted without TLS is anyone's.
pub async fn foreign_leases(pool: &PgPool, leases: &[Uuid], identity: &str) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar(
        "SELECT lease_id FROM leases
         WHERE lease_id = ANY($1) AND identity IS NOT NULL AND identity <> $2 AND prover_identity IS DISTINCT FROM $2",
    )
    .bind(leases)
    .bind(identity)
    .fetch_all(pool)
    .await?)
}

/// What rejecting a job's input proofs did ([`reject_inputs`]).
#[derive(Debug, Default)]
pub struct Rejection {
    /// The batch.
    pub batch_number: i64,
    /// The consuming job's labels (its lease ended, not counted).
    pub job: JobLabels,
    /// The input jobs queued again: `(job id, the rejected lease, who handed the proof in)`.
    pub requeued: Vec<(i64, Option<Uuid>, Option<String>)>,
    /// Worker names quarantined by these strikes.
    pub quarantined: Vec<String>,
}

/// The next round found input proofs `bad` (indices into the inputs of the job leased under
/// `lease`, in `job_inputs.position` order) that do not verify. In one transaction: each such
/// input job that had succeeded is queued again (its lease's outcome becomes `rejected`), the
/// worker name that completed it gets a strike (`strikes`), and a name with
/// `quarantine_after` strikes is quarantined (`quarantined_workers`); the consuming job goes
/// back to waiting for its inputs, its attempt not counted. `Ok(None)`: `lease` is not current.
/// Errors: an index beyond the job's inputs (`DbError::Invalid`), database errors.
pub async fn reject_inputs(pool: &PgPool, lease: Uuid, bad: &[u32], reason: &str, quarantine_after: i64) -> Result<Option<Rejection>, DbError> {
    let mut tx = pool.begin().await?;
    let job = sqlx::query_as::<_, (i64, i64, String, i16, i16)>(
        "SELECT id, batch_number, kind, aggregation_round, circuit_id FROM jobs WHERE lease_id = $1 AND status = 'leased' FOR UPDATE",
    )
    .bind(lease)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((consumer, batch, kind, round, circuit_id)) = job else { return Ok(None) };
    let inputs = sqlx::query_as::<_, (i64, String, Option<Uuid>, Option<String>)>(
        "SELECT i.id, i.status, i.lease_id, i.leased_to FROM job_inputs ji JOIN jobs i ON i.id = ji.input_job_id
         WHERE ji.job_id = $1 ORDER BY ji.position FOR UPDATE OF i",
    )
    .bind(consumer)
    .fetch_all(&mut *tx)
    .await?;
    let mut out = Rejection { batch_number: batch, job: JobLabels { kind, round, circuit_id }, ..Rejection::default() };
    for &i in bad {
        let (input, status, input_lease, holder) = inputs
            .get(i as usize)
            .ok_or_else(|| DbError::Invalid(format!("bad input {i}: job {consumer} has {} inputs", inputs.len())))?;
        if status != "succeeded" {
            continue; // already being proven again
        }
        sqlx::query(
            "UPDATE jobs SET status = 'queued', queued_at = now(), finished_at = NULL, lease_id = NULL, leased_to = NULL, error = $2
             WHERE id = $1",
        )
        .bind(input)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE leases SET outcome = 'rejected', error = $2 WHERE lease_id = $1").bind(input_lease).bind(reason).execute(&mut *tx).await?;
        let who: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT name, identity FROM workers WHERE id = $1").bind(holder).fetch_optional(&mut *tx).await?;
        if let (Some((name, identity)), Some(input_lease)) = (&who, input_lease) {
            sqlx::query("INSERT INTO strikes (worker_name, identity, job_id, lease_id, reason) VALUES ($1, $2, $3, $4, $5)")
                .bind(name)
                .bind(identity)
                .bind(input)
                .bind(input_lease)
                .bind(reason)
                .execute(&mut *tx)
                .await?;
            let quarantined: Option<String> = sqlx::query_scalar(
                "INSERT INTO quarantined_workers (worker_name, reason)
                 SELECT $1, $2 WHERE (SELECT count(*) FROM strikes WHERE worker_name = $1) >= $3
                 ON CONFLICT DO NOTHING RETURNING worker_name",
            )
            .bind(name)
            .bind(format!("proofs that did not verify; the last: {reason}"))
            .bind(quarantine_after)
            .fetch_optional(&mut *tx)
            .await?;
            out.quarantined.extend(quarantined);
        }
        out.requeued.push((*input, *input_lease, who.map(|(name, _)| name)));
    }
    sqlx::query(
        "UPDATE jobs SET status = 'waiting', attempts = attempts - 1, lease_id = NULL, leased_to = NULL, lease_deadline = NULL, error = $2
         WHERE id = $1",
    )
    .bind(consumer)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE leases SET outcome = 'failed', ended_at = now(), error = $2 WHERE lease_id = $1").bind(lease).bind(reason).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(Some(out))
}

/// Whether worker name `name` is quarantined.
pub async fn is_quarantined(pool: &PgPool, name: &str) -> Result<bool, DbError> {
    Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM quarantined_workers WHERE worker_name = $1)").bind(name).fetch_one(pool).await?)
}

/// Lifts `name`'s quarantine. Returns whether it was quarantined.
pub async fn release_worker(pool: &PgPool, name: &str) -> Result<bool, DbError> {
    Ok(sqlx::query("DELETE FROM quarantined_workers WHERE worker_name = $1").bind(name).execute(pool).await?.rows_affected() > 0)
}

/// Strikes per worker name, for `names`.
pub async fn strikes(pool: &PgPool, names: &[String]) -> Result<Vec<(String, i64)>, DbError> {
    Ok(sqlx::query_as("SELECT worker_name, count(*) FROM strikes WHERE worker_name = ANY($1) GROUP BY worker_name")
        .bind(names)
        .fetch_all(pool)
        .await?)
}
