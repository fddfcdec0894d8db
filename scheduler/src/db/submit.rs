//! Submission: a batch and its round-0 witness generation, the job graph a round-0 completion
//! plans, and the queue's order key.

use const_format::formatcp;
use crate::job_state::lit::{PROVING, QUEUED, UNFINISHED, WAITING};
use sqlx::PgConnection;

use super::*;

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
        formatcp!("INSERT INTO batches (batch_number, protocol_minor, protocol_patch, geometry, status, input_key, priority, content_sha256)
         VALUES ($1, $2, $3, $4, {PROVING}, $5, $6, $7) ON CONFLICT (batch_number) DO NOTHING"),
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
            formatcp!("INSERT INTO jobs (batch_number, kind, aggregation_round, circuit_id, status, max_attempts, priority,
                               protocol_minor, protocol_patch, input_key, queued_at, urgency)
             VALUES ($1, 'witness_generation', 0, 0, {QUEUED}, $2, $3, $4, $5, $6, now(),
                     $3 * $7 - extract(epoch FROM now())::float8)"),
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

/// Recomputes the lease order key (`jobs.urgency`) of every unfinished job for `ageing_secs`,
/// if the queue was last ordered with another ageing period (`scheduler_settings`): the
/// scheduler calls this when it starts, so a changed `--priority-ageing-secs` applies to the
/// queue, and an unchanged one costs one read. Returns the jobs reordered (0 when unchanged).
pub async fn rerank(pool: &PgPool, ageing_secs: f64) -> Result<u64, DbError> {
    let mut tx = pool.begin().await?;
    let recorded: Option<f64> =
        sqlx::query_scalar("SELECT value FROM scheduler_settings WHERE name = 'priority_ageing_secs' FOR UPDATE")
            .fetch_optional(&mut *tx)
            .await?;
    if recorded == Some(ageing_secs) {
        return Ok(0);
    }
    let n = sqlx::query(
        formatcp!("UPDATE jobs j SET urgency = j.priority * $1 - extract(epoch FROM b.created_at)::float8
         FROM batches b WHERE b.batch_number = j.batch_number AND j.status IN {UNFINISHED}"),
    )
    .bind(ageing_secs)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query(
        "INSERT INTO scheduler_settings (name, value) VALUES ('priority_ageing_secs', $1)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
    )
    .bind(ageing_secs)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(n)
}

/// Inserts the job graph (`jobs` in plan order: each job's inputs come before it) in three
/// set-based statements, whatever its size: the ids, the jobs (those without inputs queued at
/// once, the others waiting with their input count in `unfinished_inputs`), the edges. Returns
/// how many were queued.
pub(super) async fn insert_graph(
    conn: &mut PgConnection,
    batch: i64,
    jobs: &[NewJob],
    settings: &Settings,
    (priority, minor, patch): (i32, i32, i32),
) -> Result<u64, DbError> {
    let n = i32::try_from(jobs.len()).map_err(|_| DbError::Invalid(format!("batch {batch}: {} jobs", jobs.len())))?;
    let ids: Vec<i64> =
        sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('jobs', 'id')) AS id FROM generate_series(1, $1) ORDER BY id")
            .bind(n)
            .fetch_all(&mut *conn)
            .await?;
    let kinds: Vec<&str> = jobs.iter().map(|j| j.kind.as_str()).collect();
    let rounds: Vec<i16> = jobs.iter().map(|j| i16::from(j.round)).collect();
    let circuits: Vec<i16> = jobs.iter().map(|j| i16::from(j.circuit_id)).collect();
    let depths: Vec<i16> = jobs.iter().map(|j| i16::from(j.depth)).collect();
    let seqs: Vec<i32> = jobs.iter().map(|j| j.sequence_number as i32).collect();
    let max_attempts: Vec<i32> = jobs.iter().map(|j| settings.max_attempts.of(j.kind)).collect();
    let input_keys: Vec<Option<String>> = jobs.iter().map(|j| j.input_key.clone()).collect();
    let output_keys: Vec<Option<String>> = jobs.iter().map(|j| j.output_key.clone()).collect();
    let weights: Vec<i32> = jobs.iter().map(|j| settings.policy.job_weights.of(j.kind, j.round, j.circuit_id)).collect();
    let inputs: Vec<i32> = jobs.iter().map(|j| j.inputs.len() as i32).collect();
    const INSERT: &str = formatcp!(
        "INSERT INTO jobs (id, batch_number, kind, aggregation_round, circuit_id, depth, sequence_number, status,
                           max_attempts, priority, protocol_minor, protocol_patch, input_key, output_key, queued_at,
                           weight_mib, urgency, unfinished_inputs)
         SELECT t.id, $2, t.kind, t.round, t.circuit, t.depth, t.seq,
                CASE WHEN t.inputs = 0 THEN {QUEUED} ELSE {WAITING} END, t.max_attempts, $3, $4, $5,
                t.input_key, t.output_key, CASE WHEN t.inputs = 0 THEN now() END, t.weight,
                $3 * $6 - (SELECT extract(epoch FROM created_at)::float8 FROM batches WHERE batch_number = $2), t.inputs
         FROM unnest($1::bigint[], $7::text[], $8::smallint[], $9::smallint[], $10::smallint[], $11::int[], $12::int[],
                     $13::text[], $14::text[], $15::int[], $16::int[])
              AS t(id, kind, round, circuit, depth, seq, max_attempts, input_key, output_key, weight, inputs)"
    );
    sqlx::query(INSERT)
        .bind(&ids)
        .bind(batch)
        .bind(priority)
        .bind(minor)
        .bind(patch)
        .bind(settings.policy.ageing_secs)
        .bind(&kinds)
        .bind(&rounds)
        .bind(&circuits)
        .bind(&depths)
        .bind(&seqs)
        .bind(&max_attempts)
        .bind(&input_keys)
        .bind(&output_keys)
        .bind(&weights)
        .bind(&inputs)
        .execute(&mut *conn)
        .await?;
    let (mut consumers, mut producers, mut positions) = (vec![], vec![], vec![]);
    for (i, job) in jobs.iter().enumerate() {
        for (position, &input) in job.inputs.iter().enumerate() {
            consumers.push(ids[i]);
            producers.push(*ids.get(input).ok_or_else(|| DbError::Invalid(format!("batch {batch}: job {i} has input {input}")))?);
            positions.push(position as i32);
        }
    }
    sqlx::query(
        "INSERT INTO job_inputs (job_id, input_job_id, position) SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::int[])",
    )
    .bind(&consumers)
    .bind(&producers)
    .bind(&positions)
    .execute(&mut *conn)
    .await?;
    Ok(inputs.iter().filter(|&&n| n == 0).count() as u64)
}
