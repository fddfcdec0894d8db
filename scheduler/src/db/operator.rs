//! The SQL behind `Admin`: what operators read (jobs, queue depth, worker activity) and the
//! changes they make (requeue a job, cancel a batch, set a batch's priority). Every change is one
//! transaction that records the leases it ends in `leases`, like the worker-driven transitions.

use const_format::formatcp;
use crate::job_state::lit::{FAILED, LEASED, PROVING, QUEUED, SUPERSEDED, UNFINISHED};
use sqlx::PgPool;
use uuid::Uuid;

use super::{fail_batch, DbError, JobIdentityRow, JobLabels};

/// A job as `Admin.ListJobs` shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    /// `jobs.id`.
    pub id: i64,
    /// What the job is.
    #[sqlx(flatten)]
    pub job: JobIdentityRow,
    /// waiting, queued, leased, succeeded, failed.
    pub status: String,
    /// Attempts so far.
    pub attempts: i32,
    /// Its limit.
    pub max_attempts: i32,
    /// Priority (its batch's).
    pub priority: i32,
    /// The current lease.
    pub lease_id: Option<Uuid>,
    /// The connection holding it.
    pub leased_to: Option<String>,
    /// Lease deadline, Unix milliseconds.
    pub deadline_ms: Option<i64>,
    /// Last error.
    pub error: Option<String>,
    /// Unix milliseconds.
    pub queued_ms: Option<i64>,
    /// Unix milliseconds.
    pub leased_ms: Option<i64>,
    /// Unix milliseconds.
    pub finished_ms: Option<i64>,
    /// CPU seconds reported.
    pub compute_secs: Option<f64>,
}

const JOB_COLUMNS: &str = "id, batch_number, kind, aggregation_round, circuit_id, depth, sequence_number, status,
     attempts, max_attempts, priority, protocol_minor, protocol_patch, lease_id, leased_to,
     (extract(epoch FROM lease_deadline) * 1000)::bigint AS deadline_ms, error,
     (extract(epoch FROM queued_at) * 1000)::bigint AS queued_ms,
     (extract(epoch FROM leased_at) * 1000)::bigint AS leased_ms,
     (extract(epoch FROM finished_at) * 1000)::bigint AS finished_ms, compute_secs";

/// Which jobs `Admin.ListJobs` lists: `None` matches any; ids above `after_id`, at most `limit`.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Batch number.
    pub batch: Option<i64>,
    /// 0..=5.
    pub round: Option<i16>,
    /// Circuit id.
    pub circuit_id: Option<i16>,
    /// Status.
    pub status: Option<String>,
    /// The page starts after this job id.
    pub after_id: i64,
    /// Page size.
    pub limit: i64,
}

/// Jobs matching `f`, by id.
pub async fn jobs(pool: &PgPool, f: &JobFilter) -> Result<Vec<JobRow>, DbError> {
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs
         WHERE ($1::bigint IS NULL OR batch_number = $1) AND ($2::smallint IS NULL OR aggregation_round = $2)
           AND ($3::smallint IS NULL OR circuit_id = $3) AND ($4::text IS NULL OR status = $4) AND id > $5
         ORDER BY id LIMIT $6"
    );
    Ok(sqlx::query_as::<_, JobRow>(sqlx::AssertSqlSafe(sql))
        .bind(f.batch)
        .bind(f.round)
        .bind(f.circuit_id)
        .bind(&f.status)
        .bind(f.after_id)
        .bind(f.limit)
        .fetch_all(pool)
        .await?)
}

/// One job, or `None`.
pub async fn job(pool: &PgPool, id: i64) -> Result<Option<JobRow>, DbError> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
    Ok(sqlx::query_as::<_, JobRow>(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(pool).await?)
}

/// Unfinished jobs of one (round, circuit id, protocol version, kind) in one status.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DepthRow {
    /// 0..=5.
    pub aggregation_round: i16,
    /// Circuit id.
    pub circuit_id: i16,
    /// Protocol version, minor.
    pub protocol_minor: i32,
    /// Protocol version, patch.
    pub protocol_patch: i32,
    /// Job kind.
    pub kind: String,
    /// waiting, queued or leased.
    pub status: String,
    /// How many.
    pub jobs: i64,
}

/// The queue depth, from the unfinished jobs (an index covers them, so it stays cheap as the
/// table grows), and the age of the oldest queued job in seconds (0 if none).
pub async fn queue_depth(pool: &PgPool) -> Result<(Vec<DepthRow>, f64), DbError> {
    let rows = sqlx::query_as::<_, DepthRow>(
        formatcp!("SELECT aggregation_round, circuit_id, protocol_minor, protocol_patch, kind, status, count(*) AS jobs
         FROM jobs WHERE status IN {UNFINISHED}
         GROUP BY aggregation_round, circuit_id, protocol_minor, protocol_patch, kind, status
         ORDER BY aggregation_round, circuit_id, protocol_minor, protocol_patch, kind, status"),
    )
    .fetch_all(pool)
    .await?;
    let oldest: f64 = sqlx::query_scalar(
        formatcp!("SELECT COALESCE(extract(epoch FROM now() - min(queued_at)), 0)::float8 FROM jobs WHERE status = {QUEUED}"),
    )
    .fetch_one(pool)
    .await?;
    Ok((rows, oldest))
}

/// Per connection id: last heartbeat (Unix milliseconds), leases attached to it now, and the sum
/// of their weights (MiB).
pub async fn worker_activity(pool: &PgPool, ids: &[String]) -> Result<Vec<(String, i64, i64, i64)>, DbError> {
    Ok(sqlx::query_as(
        formatcp!("SELECT w.id, (extract(epoch FROM w.last_seen) * 1000)::bigint, count(j.id), COALESCE(sum(j.weight_mib), 0)::bigint
         FROM workers w LEFT JOIN jobs j ON j.leased_to = w.id AND j.status = {LEASED}
         WHERE w.id = ANY($1) GROUP BY w.id, w.last_seen"),
    )
    .bind(ids)
    .fetch_all(pool)
    .await?)
}

/// A lease an operator's change ended (outcome `superseded`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TakenLease {
    /// The lease.
    pub lease_id: Uuid,
    /// The connection that held it, to revoke it there.
    pub holder: Option<String>,
    /// Its job's labels.
    #[sqlx(flatten)]
    pub job: JobLabels,
}

impl TakenLease {
    /// Its end, for [`crate::state::Shared::apply`]: superseded, taken from its holder for `reason`.
    pub fn end<'a>(&'a self, batch: i64, reason: &'a str) -> crate::state::LeaseEnd<'a> {
        crate::state::LeaseEnd {
            outcome: crate::job_state::LeaseOutcome::Superseded,
            lease: Some(self.lease_id),
            job: &self.job,
            batch,
            taken_from: Some((self.holder.as_deref(), reason)),
        }
    }
}

/// What `requeue` did.
#[derive(Debug)]
pub enum Requeue {
    /// No such job.
    NotFound,
    /// Only a leased job can be requeued; it is in this status.
    NotLeased(String),
    /// Queued again; the lease that was taken away, and the batch.
    Requeued(TakenLease, i64),
}

/// Takes a leased job's lease away (outcome `superseded`, with `reason`) and queues the job
/// again without spending the attempt.
pub async fn requeue(pool: &PgPool, job: i64, reason: &str) -> Result<Requeue, DbError> {
    let mut tx = pool.begin().await?;
    let row: Option<(String, Option<Uuid>, Option<String>, i64, String, i16, i16)> = sqlx::query_as(
        "SELECT status, lease_id, leased_to, batch_number, kind, aggregation_round, circuit_id FROM jobs WHERE id = $1 FOR UPDATE",
    )
    .bind(job)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((status, lease, holder, batch, kind, round, circuit_id)) = row else { return Ok(Requeue::NotFound) };
    let Some(lease) = lease.filter(|_| status == crate::job_state::JobStatus::Leased.as_str()) else { return Ok(Requeue::NotLeased(status)) };
    sqlx::query(formatcp!("UPDATE leases SET outcome = {SUPERSEDED}, ended_at = now(), error = $2 WHERE lease_id = $1 AND outcome IS NULL"))
        .bind(lease)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        formatcp!("UPDATE jobs SET status = {QUEUED}, lease_id = NULL, leased_to = NULL, lease_deadline = NULL,
                         attempts = attempts - 1, queued_at = now(), error = $2
         WHERE id = $1"),
    )
    .bind(job)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Requeue::Requeued(TakenLease { lease_id: lease, holder, job: JobLabels { kind, round, circuit_id } }, batch))
}

/// Fails a proving batch with `error`: its waiting and queued jobs fail, its leased jobs fail
/// and their leases end (outcome `superseded`). `None` if the batch is not proving (unknown,
/// proven or failed already); otherwise the leases taken away.
pub async fn cancel_batch(pool: &PgPool, batch: i64, error: &str) -> Result<Option<Vec<TakenLease>>, DbError> {
    let mut tx = pool.begin().await?;
    let proving: bool =
        sqlx::query_scalar(formatcp!("SELECT EXISTS (SELECT 1 FROM batches WHERE batch_number = $1 AND status = {PROVING} FOR UPDATE)"))
            .bind(batch)
            .fetch_one(&mut *tx)
            .await?;
    if !proving {
        return Ok(None);
    }
    fail_batch(&mut tx, batch, error).await?;
    let taken: Vec<TakenLease> = sqlx::query_as(
        formatcp!("WITH old AS (SELECT id, lease_id, leased_to FROM jobs WHERE batch_number = $1 AND status = {LEASED} FOR UPDATE)
         UPDATE jobs SET status = {FAILED}, error = 'batch cancelled', finished_at = now(),
                         lease_id = NULL, leased_to = NULL, lease_deadline = NULL
         FROM old WHERE jobs.id = old.id
         RETURNING old.lease_id, old.leased_to AS holder, jobs.kind, jobs.aggregation_round AS round, jobs.circuit_id"),
    )
    .bind(batch)
    .fetch_all(&mut *tx)
    .await?;
    let ids: Vec<Uuid> = taken.iter().map(|t| t.lease_id).collect();
    sqlx::query(formatcp!("UPDATE leases SET outcome = {SUPERSEDED}, ended_at = now(), error = 'batch cancelled' WHERE lease_id = ANY($1)"))
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(taken))
}

/// Sets a batch's priority and its unfinished jobs'. Returns whether the batch exists.
pub async fn set_batch_priority(pool: &PgPool, batch: i64, priority: i32, ageing_secs: f64) -> Result<bool, DbError> {
    let mut tx = pool.begin().await?;
    let found = sqlx::query("UPDATE batches SET priority = $2 WHERE batch_number = $1")
        .bind(batch)
        .bind(priority)
        .execute(&mut *tx)
        .await?
        .rows_affected()
        == 1;
    sqlx::query(
        formatcp!("UPDATE jobs j SET priority = $2, urgency = $2 * $3 - extract(epoch FROM b.created_at)::float8
         FROM batches b WHERE b.batch_number = j.batch_number
           AND j.batch_number = $1 AND j.status IN {UNFINISHED}"),
    )
    .bind(batch)
    .bind(priority)
    .bind(ageing_secs)
    .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(found)
}

/// Finished batches (proven or failed) whose artifacts are still there and that finished more than
/// `retention_secs` ago: at most `limit`, oldest first.
pub async fn batches_to_clean(pool: &PgPool, retention_secs: f64, limit: i64) -> Result<Vec<i64>, DbError> {
    Ok(sqlx::query_scalar(
        formatcp!("SELECT batch_number FROM batches
         WHERE artifacts_deleted_at IS NULL AND status <> {PROVING} AND finished_at < now() - make_interval(secs => $1)
         ORDER BY finished_at LIMIT $2"),
    )
    .bind(retention_secs)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Deletes the records of worker connections that ended more than `retention_secs` ago and
/// hold no lease (a reconnect within the grace may still re-attach one), at most `limit` per
/// call, oldest first: the `workers` table grows by a row per registration and would otherwise
/// grow for ever. Returns how many.
pub async fn prune_workers(pool: &PgPool, retention_secs: f64, limit: i64) -> Result<u64, DbError> {
    Ok(sqlx::query(formatcp!(
        "DELETE FROM workers WHERE id IN (
             SELECT w.id FROM workers w
             WHERE w.disconnected_at < now() - make_interval(secs => $1)
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.leased_to = w.id AND j.status = {LEASED})
             ORDER BY w.disconnected_at LIMIT $2)"
    ))
    .bind(retention_secs)
    .bind(limit)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Records that a finished batch's artifacts are deleted and deletes its lease history. Returns the
/// leases deleted. Never applies to a batch still proving.
pub async fn mark_cleaned(pool: &PgPool, batch: i64) -> Result<u64, DbError> {
    let mut tx = pool.begin().await?;
    let marked = sqlx::query(formatcp!("UPDATE batches SET artifacts_deleted_at = now() WHERE batch_number = $1 AND status <> {PROVING}"))
        .bind(batch)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    let leases = if marked == 1 {
        sqlx::query("DELETE FROM leases WHERE job_id IN (SELECT id FROM jobs WHERE batch_number = $1)")
            .bind(batch)
            .execute(&mut *tx)
            .await?
            .rows_affected()
    } else {
        0
    };
    tx.commit().await?;
    Ok(leases)
}

/// One `audit_log` row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    /// `audit_log.id`.
    pub id: i64,
    /// When, Unix milliseconds.
    pub at_ms: i64,
    /// Who (certificate subject, or `anonymous (TLS off)`).
    pub identity: String,
    /// The `Admin` method.
    pub method: String,
    /// Its arguments, as text.
    pub details: String,
    /// `ok` or the error.
    pub outcome: String,
}

/// Appends an `Admin` change to the audit log.
pub async fn audit(pool: &PgPool, identity: &str, method: &str, details: &str, outcome: &str) -> Result<(), DbError> {
    sqlx::query("INSERT INTO audit_log (identity, method, details, outcome) VALUES ($1, $2, $3, $4)")
        .bind(identity)
        .bind(method)
        .bind(details)
        .bind(outcome)
        .execute(pool)
        .await?;
    Ok(())
}

/// The newest `limit` audit entries, newest first.
pub async fn audit_log(pool: &PgPool, limit: i64) -> Result<Vec<AuditRow>, DbError> {
    Ok(sqlx::query_as(
        "SELECT id, (extract(epoch FROM at) * 1000)::bigint AS at_ms, identity, method, details, outcome
         FROM audit_log ORDER BY id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
