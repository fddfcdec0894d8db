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

/// A database error, or a request the job state refuses.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    /// The completion's lease is not the job's current lease (expired, requeued, or already completed).
    #[error("lease {0} is not current (stale or unknown): nothing recorded")]
    StaleLease(Uuid),
    /// Stored data that the scheduler cannot interpret.
    #[error("job state: {0}")]
    Invalid(String),
}

/// A job handed to a worker.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LeasedJob {
    /// `jobs.id`.
    pub id: i64,
    /// The lease (fencing token).
    pub lease_id: Uuid,
    /// Batch number.
    pub batch_number: i64,
    /// `jobs.kind`.
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
    /// The job's own input artifact, if any.
    pub input_key: Option<String>,
    /// The job's output artifact, if any.
    pub output_key: Option<String>,
    /// Lease deadline, Unix milliseconds.
    pub deadline_ms: i64,
    /// The batch's geometry (7 numbers).
    pub geometry: Vec<i32>,
}

/// What a successful completion changed.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    /// The batch.
    pub batch_number: i64,
    /// Jobs that became queued.
    pub queued: u64,
    /// The batch is now proven.
    pub batch_proven: bool,
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

/// Inserts a batch and its round-0 witness-generation job (queued). Idempotent: returns `false`
/// and changes nothing if the batch exists.
pub async fn submit_batch(
    pool: &PgPool,
    batch: BatchNumber,
    version: ProtocolVersion,
    geometry: &Geometry,
    input_key: &str,
    priority: i32,
    max_attempts: i32,
) -> Result<bool, DbError> {
    let mut tx = pool.begin().await?;
    let created = sqlx::query(
        "INSERT INTO batches (batch_number, protocol_minor, protocol_patch, geometry, status, input_key, priority)
         VALUES ($1, $2, $3, $4, 'proving', $5, $6) ON CONFLICT (batch_number) DO NOTHING",
    )
    .bind(i64::from(batch.0))
    .bind(i32::from(version.minor))
    .bind(i32::from(version.patch))
    .bind(geometry_to_row(geometry))
    .bind(input_key)
    .bind(priority)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if created {
        sqlx::query(
            "INSERT INTO jobs (batch_number, kind, aggregation_round, circuit_id, status, max_attempts, priority,
                               protocol_minor, protocol_patch, input_key, queued_at)
             VALUES ($1, 'witness_generation', 0, 0, 'queued', $2, $3, $4, $5, $6, now())",
        )
        .bind(i64::from(batch.0))
        .bind(max_attempts)
        .bind(priority)
        .bind(i32::from(version.minor))
        .bind(i32::from(version.patch))
        .bind(input_key)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(created)
}

/// Leases the next queued job of `kind` to `worker`: highest priority, then lowest batch number,
/// skipping rows other transactions hold (`FOR UPDATE SKIP LOCKED`). `versions` are packed
/// protocol versions (`minor << 16 | patch`) the worker accepts; empty accepts all.
/// Returns `None` when nothing is queued for it.
pub async fn lease(
    pool: &PgPool,
    kind: JobKind,
    worker: &str,
    versions: &[i32],
    lease_secs: f64,
) -> Result<Option<LeasedJob>, DbError> {
    let job = sqlx::query_as::<_, LeasedJob>(
        "WITH picked AS (
             UPDATE jobs SET status = 'leased', lease_id = $1, leased_to = $2, attempts = attempts + 1,
                    lease_deadline = now() + make_interval(secs => $5), leased_at = now()
             WHERE id = (
                 SELECT id FROM jobs
                 WHERE status = 'queued' AND kind = $3
                   AND (cardinality($4::int[]) = 0 OR (protocol_minor * 65536 + protocol_patch) = ANY($4))
                 ORDER BY priority DESC, batch_number, id
                 LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING *)
         SELECT p.id, p.lease_id, p.batch_number, p.kind, p.aggregation_round, p.circuit_id, p.depth,
                p.sequence_number, p.protocol_minor, p.protocol_patch, p.input_key, p.output_key,
                (extract(epoch FROM p.lease_deadline) * 1000)::bigint AS deadline_ms, b.geometry
         FROM picked p JOIN batches b USING (batch_number)",
    )
    .bind(Uuid::new_v4())
    .bind(worker)
    .bind(kind.as_str())
    .bind(versions)
    .bind(lease_secs)
    .fetch_optional(pool)
    .await?;
    Ok(job)
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
        "UPDATE jobs SET status = 'queued', lease_id = NULL, leased_to = NULL, lease_deadline = NULL,
                attempts = attempts - 1, queued_at = now()
         WHERE lease_id = $1 AND status = 'leased'",
    )
    .bind(lease_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Requeues every lease held by a worker that went away (the attempt counts); past
/// `max_attempts` the job and its batch fail. Returns the leases released, with their batches.
pub async fn release_worker(pool: &PgPool, worker: &str) -> Result<Vec<(Uuid, i64)>, DbError> {
    let leases: Vec<Uuid> = sqlx::query_scalar("SELECT lease_id FROM jobs WHERE leased_to = $1 AND status = 'leased'")
        .bind(worker)
        .fetch_all(pool)
        .await?;
    let mut released = vec![];
    for lease in leases {
        match fail(pool, lease, &format!("worker {worker} disconnected"), true).await {
            Ok(b) => released.push((lease, b)),
            Err(DbError::StaleLease(_)) => {}
            Err(e) => return Err(e),
        }
    }
    sqlx::query("UPDATE workers SET disconnected_at = now() WHERE id = $1").bind(worker).execute(pool).await?;
    Ok(released)
}

/// Renews the deadline of every lease `worker` holds.
pub async fn renew(pool: &PgPool, worker: &str, lease_secs: f64) -> Result<u64, DbError> {
    let n = sqlx::query(
        "UPDATE jobs SET lease_deadline = now() + make_interval(secs => $2)
         WHERE leased_to = $1 AND status = 'leased'",
    )
    .bind(worker)
    .bind(lease_secs)
    .execute(pool)
    .await?
    .rows_affected();
    sqlx::query("UPDATE workers SET last_seen = now() WHERE id = $1").bind(worker).execute(pool).await?;
    Ok(n)
}

/// Records a completion. Refused with [`DbError::StaleLease`] unless `lease` is the job's current
/// lease. A round-0 witness generation inserts the batch's job graph from `counts`; every
/// completion queues the waiting jobs whose inputs are now all done; compression marks the batch
/// proven. One transaction.
pub async fn complete(
    pool: &PgPool,
    lease: Uuid,
    counts: &[(CircuitId, u32)],
    compute_secs: f64,
    max_attempts: i32,
) -> Result<Completion, DbError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query_as::<_, (i64, i64, String, i16, i32, i32, i32, Option<String>)>(
        "UPDATE jobs SET status = 'succeeded', finished_at = now(), compute_secs = $2, lease_deadline = NULL
         WHERE lease_id = $1 AND status = 'leased'
         RETURNING id, batch_number, kind, aggregation_round, priority, protocol_minor, protocol_patch, output_key",
    )
    .bind(lease)
    .bind(compute_secs)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((id, batch, kind, round, priority, minor, patch, output_key)) = row else {
        return Err(DbError::StaleLease(lease));
    };
    let kind = JobKind::parse(&kind).ok_or_else(|| DbError::Invalid(format!("job {id} kind {kind}")))?;
    let mut done = Completion { batch_number: batch, ..Completion::default() };
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
                    let settings = (max_attempts, priority, minor, patch);
                    done.queued = insert_graph(&mut tx, batch, &jobs, settings).await?;
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
    (max_attempts, priority, minor, patch): (i32, i32, i32, i32),
) -> Result<u64, DbError> {
    let mut ids = Vec::with_capacity(jobs.len());
    let mut queued = 0;
    for job in jobs {
        let ready = job.inputs.is_empty();
        queued += u64::from(ready);
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO jobs (batch_number, kind, aggregation_round, circuit_id, depth, sequence_number, status,
                               max_attempts, priority, protocol_minor, protocol_patch, input_key, output_key, queued_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, CASE WHEN $7 = 'queued' THEN now() END)
             RETURNING id",
        )
        .bind(batch)
        .bind(job.kind.as_str())
        .bind(i16::from(job.round))
        .bind(i16::from(job.circuit_id))
        .bind(i16::from(job.depth))
        .bind(job.sequence_number as i32)
        .bind(if ready { "queued" } else { "waiting" })
        .bind(max_attempts)
        .bind(priority)
        .bind(minor)
        .bind(patch)
        .bind(&job.input_key)
        .bind(&job.output_key)
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

/// Records a failure. A retryable one under `max_attempts` goes back to the queue; otherwise the
/// job fails and so does its batch (its unfinished jobs stop). Refused with
/// [`DbError::StaleLease`] unless `lease` is current. Returns the batch number.
pub async fn fail(pool: &PgPool, lease: Uuid, error: &str, retryable: bool) -> Result<i64, DbError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query_as::<_, (i64, String, String, i16, i16, i16, i32)>(
        "UPDATE jobs SET
             status = CASE WHEN $3 AND attempts < max_attempts THEN 'queued' ELSE 'failed' END,
             queued_at = now(), lease_id = NULL, leased_to = NULL, lease_deadline = NULL, error = $2,
             finished_at = CASE WHEN $3 AND attempts < max_attempts THEN NULL ELSE now() END
         WHERE lease_id = $1 AND status = 'leased'
         RETURNING batch_number, status, kind, aggregation_round, circuit_id, depth, sequence_number",
    )
    .bind(lease)
    .bind(error)
    .bind(retryable)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((batch, status, kind, round, circuit, depth, seq)) = row else {
        return Err(DbError::StaleLease(lease));
    };
    if status == "failed" {
        let what = format!("{kind} job (round {round}, circuit {circuit}, depth {depth}, seq {seq}) failed: {error}");
        fail_batch(&mut tx, batch, &what).await?;
    }
    tx.commit().await?;
    Ok(batch)
}

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
                count(*) FILTER (WHERE status = 'leased') AS in_progress
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
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO workers (id, name, role, zone, region, host, capacity, prover_endpoint)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id)
    .bind(name)
    .bind(role)
    .bind(zone)
    .bind(region)
    .bind(host)
    .bind(capacity as i32)
    .bind(prover_endpoint)
    .execute(pool)
    .await?;
    Ok(())
}
