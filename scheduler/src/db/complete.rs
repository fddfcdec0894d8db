//! How leases end: a completion (the first valid result of a job wins), a failure, a hand-back,
//! an expiry, a rejection of input proofs by the next round; and what follows (readiness of the
//! jobs they feed, a batch proven or failed).

use const_format::formatcp;
use crate::job_state::lit::{EXPIRED, FAILED, LEASED, PROVEN, PROVING, QUEUED, REJECTED, SUCCEEDED, SUPERSEDED, WAITING};
use sqlx::PgConnection;

use super::*;
use crate::job_state::{JobStatus, LeaseOutcome};

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

/// The claim of results, in one statement for a whole batch of reports (`unnest`: `$1` lease
/// ids, `$2` compute seconds, `$3`, `$4` the connection and identity that handed each in; issue
/// 16 rule 4). Each lease must be current, or expired (a late result: the first valid result
/// of a job wins, and the job's newer lease is superseded, its attempt given back: the job did
/// not fail, the cluster only lost sight of it); its job must be unfinished (leased or queued).
/// Two leases of one job in one batch: the current one wins, else the first reported. It marks
/// each job succeeded under its winning lease, ends that lease (and the superseded one)
/// recording who handed the result in, and counts the successes down in every waiting job they
/// feed (`jobs.unfinished_inputs`, by how many of its inputs succeeded here), queueing those
/// that reach 0. The job rows are locked in id order (so two claims cannot deadlock); a waiting
/// job's count is decremented on its newest row (READ COMMITTED re-evaluates an `UPDATE` on a
/// row changed since its snapshot), so exactly one claim queues it. One row per report whose
/// lease exists (`ord`: its 1-based position): the lease's outcome before, then its job's
/// columns if it won now, and how many jobs it queued (a job queued by several successes of
/// the batch is counted on the first by job id).
const CLAIM: &str = formatcp!(
    "WITH r AS (SELECT * FROM unnest($1::uuid[], $2::float8[], $3::text[], $4::text[]) WITH ORDINALITY
                AS r(lease_id, compute_secs, by_conn, by_identity, ord)),
     l AS (SELECT r.*, le.job_id, le.outcome FROM r JOIN leases le ON le.lease_id = r.lease_id),
     claimable AS (SELECT * FROM l WHERE outcome IS NULL OR outcome = {EXPIRED}),
     locked AS (SELECT j.id, j.lease_id AS current, j.leased_to AS holder FROM jobs j
                WHERE j.id IN (SELECT job_id FROM claimable) AND j.status IN ({LEASED}, {QUEUED})
                ORDER BY j.id FOR UPDATE),
     old AS (SELECT DISTINCT ON (k.id) k.id, k.current, k.holder, c.lease_id AS winner, c.compute_secs, c.by_conn, c.by_identity
             FROM locked k JOIN claimable c ON c.job_id = k.id
             ORDER BY k.id, (c.lease_id = k.current) DESC, c.ord),
     done AS (UPDATE jobs SET status = {SUCCEEDED}, finished_at = now(), compute_secs = old.compute_secs, lease_id = old.winner,
                              lease_deadline = NULL, error = NULL,
                              attempts = jobs.attempts - CASE WHEN old.current <> old.winner THEN 1 ELSE 0 END
              FROM old WHERE jobs.id = old.id
              RETURNING jobs.id, jobs.batch_number, jobs.kind, jobs.aggregation_round, jobs.circuit_id, jobs.priority,
                        jobs.protocol_minor, jobs.protocol_patch, jobs.output_key, old.winner,
                        NULLIF(old.current, old.winner) AS superseded, old.holder, old.by_conn, old.by_identity),
     ended AS (UPDATE leases SET outcome = CASE WHEN leases.lease_id = done.winner THEN {SUCCEEDED} ELSE {SUPERSEDED} END,
                                 ended_at = now(),
                                 completed_by = CASE WHEN leases.lease_id = done.winner THEN done.by_conn ELSE leases.completed_by END,
                                 completed_identity = CASE WHEN leases.lease_id = done.winner THEN done.by_identity ELSE leases.completed_identity END
               FROM done WHERE leases.lease_id IN (done.winner, done.superseded)
                 AND (leases.lease_id = done.winner OR leases.outcome IS NULL)
               RETURNING 1),
     feeds AS (SELECT ji.job_id AS parent, count(*) AS n, min(done.id) AS first
               FROM job_inputs ji JOIN done ON ji.input_job_id = done.id GROUP BY ji.job_id),
     ready AS (UPDATE jobs SET unfinished_inputs = jobs.unfinished_inputs - feeds.n,
                               status = CASE WHEN jobs.unfinished_inputs = feeds.n THEN {QUEUED} ELSE jobs.status END,
                               queued_at = CASE WHEN jobs.unfinished_inputs = feeds.n THEN now() ELSE jobs.queued_at END
               FROM feeds WHERE jobs.id = feeds.parent AND jobs.status = {WAITING}
               RETURNING jobs.status, feeds.first)
     SELECT l.ord, l.outcome, d.id, d.batch_number, d.kind, d.aggregation_round, d.circuit_id, d.priority,
            d.protocol_minor, d.protocol_patch, d.output_key, d.superseded, d.holder,
            (SELECT count(*) FROM ready WHERE ready.status = {QUEUED} AND ready.first = d.id) AS queued
     FROM l LEFT JOIN done d ON d.winner = l.lease_id"
);

/// A row [`CLAIM`] returns.
#[derive(sqlx::FromRow)]
struct ClaimRow {
    ord: i64,
    outcome: Option<String>,
    id: Option<i64>,
    batch_number: Option<i64>,
    kind: Option<String>,
    aggregation_round: Option<i16>,
    circuit_id: Option<i16>,
    priority: Option<i32>,
    protocol_minor: Option<i32>,
    protocol_patch: Option<i32>,
    output_key: Option<String>,
    superseded: Option<Uuid>,
    holder: Option<String>,
    queued: i64,
}

/// A completion as a worker reports it.
#[derive(Debug, Clone)]
pub struct Report {
    /// The lease it completes.
    pub lease: Uuid,
    /// A round-0 witness generation's circuits per circuit id (the job graph is planned from them).
    pub counts: Vec<(CircuitId, u32)>,
    /// CPU seconds the job took, as the worker measured.
    pub compute_secs: f64,
    /// Compression: the worker verified the final proof against the batch file's public data
    /// (`Completed.verified_against_batch`). Ignored for other kinds.
    pub verified_against_batch: bool,
    /// The connection (`workers.id`) that handed the result in: a strike for it, if the next
    /// round rejects the proof, lands there ([`reject_inputs`]). `None`: not a worker's report.
    pub by: Option<String>,
    /// The certificate identity of that connection (`None` without TLS).
    pub identity: Option<String>,
}

/// Records a completion on `conn` (a transaction: [`complete`]'s, or the completions
/// batcher's fallback): [`complete_many`] with one report. Refused with
/// [`DbError::StaleLease`] when the lease is unknown, failed, or its job already finished
/// through another lease; other errors as [`complete_many`]'s.
pub async fn complete_in(conn: &mut PgConnection, report: &Report, settings: &Settings) -> Result<Completion, DbError> {
    complete_many(conn, &[report], settings).await?.pop().unwrap_or(Err(DbError::StaleLease(report.lease)))
}

/// Records the completions `reports` on `conn` (a transaction: the completions batcher's), in
/// one claim statement for all of them ([`CLAIM`]: the first valid result of a job wins), then
/// the few statements their kinds need: a round-0 witness generation inserts the batch's job
/// graph from its `counts`; compression marks the batch proven, and only when the report says
/// its final proof was verified against the batch (issue 16 rule 3). One result per report, in
/// order: [`DbError::StaleLease`] when its lease is unknown, failed, or its job already
/// finished through another lease (nothing changed for it); a lease reported twice (a worker
/// resends reports it saw no answer to) is recorded once, and `already_recorded` after.
/// `Err`: the transaction must be rolled back (a database error; a compression not verified
/// against its batch, [`DbError::Refused`], which the caller then records alone to end it as
/// a retryable failure).
pub async fn complete_many(conn: &mut PgConnection, reports: &[&Report], settings: &Settings) -> Result<Vec<Result<Completion, DbError>>, DbError> {
    // Each lease once: a repeat gets its first report's answer, as already recorded.
    let mut first: std::collections::HashMap<Uuid, usize> = std::collections::HashMap::new();
    let mut unique: Vec<&Report> = vec![];
    let slot: Vec<usize> = reports
        .iter()
        .map(|r| {
            *first.entry(r.lease).or_insert_with(|| {
                unique.push(r);
                unique.len() - 1
            })
        })
        .collect();
    let leases: Vec<Uuid> = unique.iter().map(|r| r.lease).collect();
    let secs: Vec<f64> = unique.iter().map(|r| r.compute_secs).collect();
    let by: Vec<Option<&str>> = unique.iter().map(|r| r.by.as_deref()).collect();
    let identities: Vec<Option<&str>> = unique.iter().map(|r| r.identity.as_deref()).collect();
    let rows: Vec<ClaimRow> =
        sqlx::query_as(CLAIM).bind(&leases).bind(&secs).bind(&by).bind(&identities).fetch_all(&mut *conn).await?;
    let mut claimed: Vec<Option<ClaimRow>> = unique.iter().map(|_| None).collect();
    for row in rows {
        let i = usize::try_from(row.ord - 1).ok().filter(|i| *i < claimed.len()).ok_or_else(|| DbError::Invalid(format!("claim row {}", row.ord)))?;
        claimed[i] = Some(row);
    }
    let mut results: Vec<Option<Result<Completion, DbError>>> = Vec::with_capacity(unique.len());
    for (report, row) in unique.iter().zip(claimed) {
        let result = match row {
            None => Err(DbError::StaleLease(report.lease)),
            Some(row) => finish(conn, report, row, settings).await?,
        };
        results.push(Some(result));
    }
    let won: Vec<bool> = results.iter().map(|r| matches!(r, Some(Ok(_)))).collect();
    Ok(slot
        .into_iter()
        .map(|i| match results[i].take() {
            Some(result) => result,
            // A repeat of a report answered above.
            None if won[i] => Ok(Completion { already_recorded: true, ..Completion::default() }),
            None => Err(DbError::StaleLease(unique[i].lease)),
        })
        .collect())
}

/// What follows the claim of one report: the answer when it did not win, else the statements
/// its kind needs ([`complete_many`]). `Err`: roll back.
async fn finish(conn: &mut PgConnection, report: &Report, row: ClaimRow, settings: &Settings) -> Result<Result<Completion, DbError>, DbError> {
    let lease = report.lease;
    let (Some(id), Some(batch), Some(kind_name), Some(round), Some(circuit_id), Some(priority), Some(minor), Some(patch)) = (
        row.id,
        row.batch_number,
        row.kind,
        row.aggregation_round,
        row.circuit_id,
        row.priority,
        row.protocol_minor,
        row.protocol_patch,
    ) else {
        return Ok(match row.outcome.as_deref().and_then(LeaseOutcome::parse) {
            Some(LeaseOutcome::Succeeded) => Ok(Completion { already_recorded: true, ..Completion::default() }),
            // Failed, handed back, unsent, superseded, rejected: no result can come from it;
            // or its job finished otherwise.
            _ => Err(DbError::StaleLease(lease)),
        });
    };
    let kind = JobKind::parse(&kind_name).ok_or_else(|| DbError::Invalid(format!("job {id} kind {kind_name}")))?;
    let job = JobLabels { kind: kind_name, round, circuit_id };
    let superseded = row.superseded.map(|other| (other, row.holder));
    let mut done = Completion { batch_number: batch, job, superseded, queued: row.queued as u64, ..Completion::default() };
    match (kind, round) {
        (JobKind::WitnessGeneration, 0) => {
            let geometry: Vec<i32> = sqlx::query_scalar("SELECT geometry FROM batches WHERE batch_number = $1")
                .bind(batch)
                .fetch_one(&mut *conn)
                .await?;
            let g = geometry_from_row(&geometry)?;
            let batch_no = BatchNumber(u32::try_from(batch).map_err(|_| DbError::Invalid(format!("batch {batch}")))?);
            match graph::plan(batch_no, &g, &report.counts) {
                Ok(jobs) => {
                    done.queued += insert_graph(conn, batch, &jobs, settings, (priority, minor, patch)).await?;
                }
                Err(e) => {
                    fail_batch(conn, batch, &format!("round-0 witness generation: {e}")).await?;
                }
            }
        }
        (JobKind::Compression, _) if !report.verified_against_batch => {
            return Err(DbError::Refused(
                "a compression completion must say its final proof was verified against the batch (verified_against_batch)".into(),
            ));
        }
        (JobKind::Compression, _) => {
            const PROVE: &str = formatcp!(
                "UPDATE batches SET status = {PROVEN}, proof_key = $2, finished_at = now()
                 WHERE batch_number = $1 AND status = {PROVING}"
            );
            sqlx::query(PROVE)
                .bind(batch)
                .bind(row.output_key.unwrap_or_else(|| keys::final_proof(BatchNumber(batch as u32))))
                .execute(&mut *conn)
                .await?;
            done.batch_proven = true;
        }
        _ => {}
    }
    Ok(Ok(done))
}

/// [`complete_in`] in a transaction of its own.
pub async fn complete<'c>(db: impl sqlx::Acquire<'c, Database = sqlx::Postgres>, report: &Report, settings: &Settings) -> Result<Completion, DbError> {
    let mut tx = db.begin().await?;
    let done = complete_in(&mut tx, report, settings).await?;
    tx.commit().await?;
    Ok(done)
}

/// Ends `lease` without success: a failure its worker reported, or an expired deadline (for
/// [`EndReason::Expired`] only if the deadline has indeed passed: a heartbeat may have won the
/// race). A retryable end under the job's `max_attempts` queues the job again; otherwise the job
/// fails with `error` and so does its batch (its unfinished jobs stop; the batch's error names
/// the job, the attempts and the last error). Refused with [`DbError::StaleLease`] unless `lease`
/// is current; `Ok(None)` when this failure was recorded before.
pub async fn end_lease<'c>(
    db: impl sqlx::Acquire<'c, Database = sqlx::Postgres>,
    lease: Uuid,
    error: &str,
    retryable: bool,
    reason: EndReason,
) -> Result<Option<Ended>, DbError> {
    let mut tx = db.begin().await?;
    let expired = reason == EndReason::Expired;
    let handed_back = reason == EndReason::HandedBack;
    let row = sqlx::query_as::<_, (i64, String, Option<String>, String, i16, i16, i16, i32, i32)>(
        formatcp!("WITH old AS (SELECT id, leased_to FROM jobs WHERE lease_id = $1 AND status = {LEASED} FOR UPDATE)
         UPDATE jobs SET
             attempts = CASE WHEN $5 THEN attempts - 1 ELSE attempts END,
             status = CASE WHEN $5 OR ($3 AND attempts < max_attempts) THEN {QUEUED} ELSE {FAILED} END,
             queued_at = now(), lease_id = NULL, leased_to = NULL, lease_deadline = NULL, error = $2,
             finished_at = CASE WHEN $5 OR ($3 AND attempts < max_attempts) THEN NULL ELSE now() END
         FROM old
         WHERE jobs.id = old.id AND (NOT $4 OR jobs.lease_deadline <= now())
         RETURNING jobs.batch_number, jobs.status, old.leased_to, jobs.kind, jobs.aggregation_round, jobs.circuit_id,
                   jobs.depth, jobs.sequence_number, jobs.attempts"),
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
            Some(Some(o)) if matches!(LeaseOutcome::parse(&o), Some(LeaseOutcome::Failed | LeaseOutcome::HandedBack)) && !expired => Ok(None),
            _ => Err(DbError::StaleLease(lease)),
        };
    };
    sqlx::query("UPDATE leases SET outcome = $2, ended_at = now(), error = $3 WHERE lease_id = $1")
        .bind(lease)
        .bind(match reason {
            EndReason::Expired => LeaseOutcome::Expired,
            EndReason::HandedBack => LeaseOutcome::HandedBack,
            EndReason::Failed => LeaseOutcome::Failed,
        }
        .as_str())
        .bind(error)
        .execute(&mut *tx)
        .await?;
    let job_failed = status == JobStatus::Failed.as_str();
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
pub(super) async fn fail_batch(tx: &mut PgConnection, batch: i64, error: &str) -> Result<(), DbError> {
    sqlx::query(
        formatcp!("UPDATE batches SET status = {FAILED}, error = $2, finished_at = now()
         WHERE batch_number = $1 AND status = {PROVING}"),
    )
    .bind(batch)
    .bind(error)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        formatcp!("UPDATE jobs SET status = {FAILED}, error = 'batch failed', finished_at = now()
         WHERE batch_number = $1 AND status IN ({WAITING}, {QUEUED})"),
    )
    .bind(batch)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// What rejecting a job's input proofs did ([`reject_inputs`]).
#[derive(Debug, Default)]
pub struct Rejection {
    /// The batch.
    pub batch_number: i64,
    /// The consuming job's labels (its lease ended, not counted).
    pub job: JobLabels,
    /// The input jobs queued again.
    pub requeued: Vec<RejectedInput>,
    /// Worker names quarantined by these strikes.
    pub quarantined: Vec<String>,
}

/// An input job whose proof the next round rejected, queued again.
#[derive(Debug, Clone)]
pub struct RejectedInput {
    /// `jobs.id`.
    pub job_id: i64,
    /// Its labels.
    pub job: JobLabels,
    /// The lease whose result was rejected.
    pub lease: Option<Uuid>,
    /// The worker name that handed the proof in.
    pub by: Option<String>,
}

/// The next round found input proofs `bad` (indices into the inputs of the job leased under
/// `lease`, in `job_inputs.position` order) that do not verify, and inputs `lost` that are
/// missing from the artifact store. In one transaction: each such input job that had succeeded
/// is queued again (its lease's outcome becomes `rejected`); for a bad proof the worker name
/// and identity that handed it in (`leases.completed_by`, `completed_identity`: for a late
/// result the expired lease's holder, never the holder of the job's newer lease) get a strike
/// (`strikes`), and a name with `quarantine_after` strikes is quarantined
/// (`quarantined_workers`); a lost one strikes nobody (storage is not a prover).
/// The consuming job goes back to waiting for its inputs, its attempt not counted.
/// `Ok(None)`: `lease` is not current. Errors: an index beyond the job's inputs, or a lost input
/// that is not a proof (a proving job's output: only those can be made again from their own
/// input) (`DbError::Invalid`, nothing changed), database errors.
pub async fn reject_inputs(
    pool: &PgPool,
    lease: Uuid,
    bad: &[u32],
    lost: &[u32],
    reason: &str,
    quarantine_after: i64,
) -> Result<Option<Rejection>, DbError> {
    let mut tx = pool.begin().await?;
    let job = sqlx::query_as::<_, (i64, i64, String, i16, i16)>(
        formatcp!("SELECT id, batch_number, kind, aggregation_round, circuit_id FROM jobs WHERE lease_id = $1 AND status = {LEASED} FOR UPDATE"),
    )
    .bind(lease)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((consumer, batch, kind, round, circuit_id)) = job else { return Ok(None) };
    // Who handed each input in: the connection that completed its winning lease (before
    // migration 0009, none was recorded: the job's last holder).
    let inputs = sqlx::query_as::<_, (i64, String, Option<Uuid>, Option<String>, Option<String>, String, i16, i16)>(
        "SELECT i.id, i.status, i.lease_id, coalesce(il.completed_by, i.leased_to), il.completed_identity,
                i.kind, i.aggregation_round, i.circuit_id
         FROM job_inputs ji JOIN jobs i ON i.id = ji.input_job_id LEFT JOIN leases il ON il.lease_id = i.lease_id
         WHERE ji.job_id = $1 ORDER BY ji.position FOR UPDATE OF i",
    )
    .bind(consumer)
    .fetch_all(&mut *tx)
    .await?;
    let mut out = Rejection { batch_number: batch, job: JobLabels { kind, round, circuit_id }, ..Rejection::default() };
    let named = bad.iter().map(|&i| (i, true)).chain(lost.iter().map(|&i| (i, false)));
    for (i, strike) in named {
        let (input, status, input_lease, handed_in_by, handed_in_identity, input_kind, input_round, input_circuit) = inputs
            .get(i as usize)
            .ok_or_else(|| DbError::Invalid(format!("input {i}: job {consumer} has {} inputs", inputs.len())))?;
        if !strike && input_kind != JobKind::Proving.as_str() {
            return Err(DbError::Invalid(format!("lost input {i} of job {consumer} is a {input_kind} output: it cannot be made again alone")));
        }
        if status != JobStatus::Succeeded.as_str() {
            continue; // already being proven again
        }
        // A lost input's job runs again on the store's account, not its own: the attempt its
        // new lease takes is given back here (a bad proof's rerun is its prover's, and counts).
        sqlx::query(
            formatcp!("UPDATE jobs SET status = {QUEUED}, queued_at = now(), finished_at = NULL, lease_id = NULL, leased_to = NULL, error = $2,
                              attempts = attempts - CASE WHEN $3 THEN 0 ELSE 1 END
             WHERE id = $1"),
        )
        .bind(input)
        .bind(reason)
        .bind(strike)
        .execute(&mut *tx)
        .await?;
        sqlx::query(formatcp!("UPDATE leases SET outcome = {REJECTED}, error = $2 WHERE lease_id = $1")).bind(input_lease).bind(reason).execute(&mut *tx).await?;
        let who: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT name, coalesce($2, identity) FROM workers WHERE id = $1")
                .bind(handed_in_by)
                .bind(handed_in_identity)
                .fetch_optional(&mut *tx)
                .await?;
        if let (true, Some((name, identity)), Some(input_lease)) = (strike, &who, input_lease) {
            sqlx::query("INSERT INTO strikes (worker_name, identity, job_id, lease_id, reason) VALUES ($1, $2, $3, $4, $5)")
                .bind(name)
                .bind(identity)
                .bind(input)
                .bind(input_lease)
                .bind(reason)
                .execute(&mut *tx)
                .await?;
            let quarantined: Option<String> = sqlx::query_scalar(
                "INSERT INTO quarantined_workers (worker_name, reason, identity)
                 SELECT $1, $2, $4 WHERE (SELECT count(*) FROM strikes WHERE worker_name = $1) >= $3
                 ON CONFLICT DO NOTHING RETURNING worker_name",
            )
            .bind(name)
            .bind(format!("proofs that did not verify; the last: {reason}"))
            .bind(quarantine_after)
            .bind(identity)
            .fetch_optional(&mut *tx)
            .await?;
            out.quarantined.extend(quarantined);
        }
        out.requeued.push(RejectedInput {
            job_id: *input,
            job: JobLabels { kind: input_kind.clone(), round: *input_round, circuit_id: *input_circuit },
            lease: *input_lease,
            by: who.map(|(name, _)| name),
        });
    }
    sqlx::query(
        formatcp!("UPDATE jobs SET status = {WAITING}, attempts = attempts - 1, lease_id = NULL, leased_to = NULL, lease_deadline = NULL, error = $2,
                         unfinished_inputs = (SELECT count(*) FROM job_inputs ji JOIN jobs i ON i.id = ji.input_job_id
                                              WHERE ji.job_id = $1 AND i.status <> {SUCCEEDED})
         WHERE id = $1"),
    )
    .bind(consumer)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    sqlx::query(formatcp!("UPDATE leases SET outcome = {FAILED}, ended_at = now(), error = $2 WHERE lease_id = $1")).bind(lease).bind(reason).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(Some(out))
}

