//! Leasing: the classes of queued work, and the lease statement the dispatch pass runs for each
//! worker that has an eligible class (docs/scheduling.md).
//!
//! A **class** is what a worker's filters can tell apart: `(kind, aggregation_round, circuit_id,
//! protocol version)`. The dispatcher reads which classes have queued jobs ([`queued_classes`],
//! a skip scan of the `jobs_queued_class` index: one index probe per class, however many jobs
//! are queued), matches them in memory against every ready worker's kind, versions and prover
//! group, and runs the lease statement only for workers with an eligible class, naming those
//! classes; so an idle worker costs no SQL, and a worker's statement reads only its own classes'
//! index ranges, never the queued jobs of other classes.

use const_format::formatcp;
use crate::job_state::lit::{LEASED, QUEUED, UNSENT};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{DbError, JobIdentityRow};
use crate::graph::JobKind;
use crate::groups::PackedPair;
use crate::state::Policy;

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

/// A class of queued work: what workers' filters tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueuedClass {
    /// The job kind (the role that leases it).
    pub kind: JobKind,
    /// `aggregation_round << 8 | circuit_id` ([`crate::groups::pack`]).
    pub pair: PackedPair,
    /// `minor << 16 | patch` ([`proofmesh_core::ProtocolVersion::packed`]).
    pub version: i32,
}

/// The classes that have at least one queued job, in index order. One recursive statement that
/// probes the `jobs_queued_class` index once per class (a "loose index scan"): its cost grows
/// with the number of classes (tens), not with the number of queued jobs (millions).
pub async fn queued_classes(conn: &mut PgConnection) -> Result<Vec<QueuedClass>, DbError> {
    const COLS: &str = "kind, aggregation_round, circuit_id, protocol_minor, protocol_patch";
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH RECURSIVE c AS (
                 (SELECT {COLS} FROM jobs WHERE status = {QUEUED} ORDER BY {COLS} LIMIT 1)
                 UNION ALL
                 SELECT n.* FROM c CROSS JOIN LATERAL (
                     SELECT {COLS} FROM jobs j
                     WHERE j.status = {QUEUED}
                       AND (j.kind, j.aggregation_round, j.circuit_id, j.protocol_minor, j.protocol_patch)
                           > (c.kind, c.aggregation_round, c.circuit_id, c.protocol_minor, c.protocol_patch)
                     ORDER BY {COLS} LIMIT 1) n)
             SELECT kind, (aggregation_round::int << 8) | circuit_id::int, (protocol_minor << 16) | protocol_patch FROM c"
        )
    });
    let rows: Vec<(String, i32, i32)> = sqlx::query_as(sqlx::AssertSqlSafe(SQL.as_str())).fetch_all(&mut *conn).await?;
    rows.into_iter()
        .map(|(kind, pair, version)| {
            let kind = JobKind::parse(&kind).ok_or_else(|| DbError::Invalid(format!("job kind {kind}")))?;
            Ok(QueuedClass { kind, pair, version })
        })
        .collect()
}

/// The classes among `classes` that a worker of `kind` declaring `versions` and `pairs` (each
/// empty: all) may take.
pub fn eligible(classes: &[QueuedClass], kind: JobKind, versions: &[i32], pairs: &[PackedPair]) -> Vec<QueuedClass> {
    classes
        .iter()
        .filter(|c| c.kind == kind)
        .filter(|c| versions.is_empty() || versions.contains(&c.version))
        .filter(|c| pairs.is_empty() || pairs.contains(&c.pair))
        .copied()
        .collect()
}

/// What the dispatcher asks [`lease_in`] for: one worker (a WVG together with the prover matched
/// with it), and the reserve setting (docs/scheduling.md).
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
/// plus one point per `ageing_secs` waited. The window of candidates is the merge of each
/// eligible class's first jobs in the `jobs_queued_class` index ([`INDEX_ORDER`]); setup-data
/// affinity then orders within it.
const LEASE_ORDER: &str = "urgency DESC, batch_number, aggregation_round DESC, warm DESC, warm_own DESC, id";
const INDEX_ORDER: &str = "urgency DESC, batch_number, aggregation_round DESC, id";

/// The lease statement. `$4` and `$6` are the eligible classes' packed versions and pairs (one
/// element per class): each class's range of the `jobs_queued_class` index is read in order, at
/// most [`LEASE_WINDOW`] rows, so the statement never looks at another class's jobs. Without a
/// memory budget (`$7` and `$8` 0) it reads one row per class: then nothing but the order
/// decides, and within one class the lease order is the index order (a class is one round and
/// one circuit id, so its setup-data affinity is the same for all its jobs).
fn lease_sql() -> String {
    format!(
        "WITH budget AS (
             SELECT LEAST(NULLIF($7::bigint, 0), NULLIF($8::bigint, 0)) AS total,
                    LEAST(CASE WHEN $7 > 0 THEN $7 - (SELECT COALESCE(sum(weight_mib), 0) FROM jobs
                                                       WHERE status = {LEASED} AND leased_to = $2) END,
                          CASE WHEN $8 > 0 THEN $8 - (SELECT COALESCE(sum(weight_mib), 0) FROM jobs
                                                       WHERE status = {LEASED} AND lease_id = ANY($9)) END) AS free),
         candidates AS (
             SELECT j.id, j.weight_mib, j.urgency, j.batch_number, j.aggregation_round,
                    (j.aggregation_round * 256 + j.circuit_id) = ANY($10) AS warm,
                    (j.aggregation_round * 256 + j.circuit_id) = ANY($11) AS warm_own,
                    j.queued_at < now() - make_interval(secs => $12) AS overdue
             FROM unnest($4::int[], $6::int[]) AS c(version, pair)
             CROSS JOIN LATERAL (
                 SELECT * FROM jobs j
                 WHERE j.status = {QUEUED} AND j.kind = $3
                   AND j.aggregation_round = (c.pair >> 8) AND j.circuit_id = (c.pair & 255)
                   AND j.protocol_minor = (c.version >> 16) AND j.protocol_patch = (c.version & 65535)
                   AND j.weight_mib <= COALESCE((SELECT total FROM budget), j.weight_mib)
                 ORDER BY j.urgency DESC, j.batch_number, j.id
                 LIMIT CASE WHEN $7 = 0 AND $8 = 0 THEN 1 ELSE {LEASE_WINDOW} END) j
             ORDER BY {INDEX_ORDER} LIMIT {LEASE_WINDOW}),
         ranked AS (
             SELECT c.*, c.weight_mib <= COALESCE(budget.free, c.weight_mib) AS fits,
                    COALESCE(bool_or(c.overdue AND c.weight_mib > budget.free)
                             OVER (ORDER BY {LEASE_ORDER} ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), false) AS held_back
             FROM candidates c, budget),
         picked AS (
             UPDATE jobs SET status = {LEASED}, lease_id = $1, leased_to = $2, attempts = attempts + 1,
                    lease_deadline = now() + make_interval(secs => $5), leased_at = now()
             WHERE status = {QUEUED}
               AND id = (SELECT id FROM ranked WHERE fits AND NOT held_back ORDER BY {LEASE_ORDER} LIMIT 1)
             RETURNING *),
         history AS (INSERT INTO leases (lease_id, job_id, worker, identity, prover_identity)
                     SELECT lease_id, id, leased_to, $13, $14 FROM picked)
         SELECT p.id, p.lease_id, p.batch_number, p.kind, p.aggregation_round, p.circuit_id, p.depth,
                p.sequence_number, p.protocol_minor, p.protocol_patch, p.input_key, p.output_key,
                (extract(epoch FROM p.lease_deadline) * 1000)::bigint AS deadline_ms, b.geometry,
                COALESCE(extract(epoch FROM now() - p.queued_at), 0)::float8 AS waited_secs, p.weight_mib
         FROM picked p CROSS JOIN LATERAL (SELECT geometry FROM batches WHERE batch_number = p.batch_number) b"
    )
}

/// Leases, on `conn` (the dispatch pass's transaction), the most urgent queued job of
/// `classes` (of `ask.kind`: the dispatcher has already matched them against the worker's
/// versions and pairs) that `ask`'s worker can take, in one statement. Eligible: a weight within
/// its whole budget. Among the [`LEASE_WINDOW`] most urgent eligible jobs ([`INDEX_ORDER`]), the
/// first in [`LEASE_ORDER`] (setup-data affinity breaking ties within a batch's round) whose
/// weight fits the free budget is leased, unless a job before it has waited past
/// `reserve_after_secs` and does not fit: then nothing, so memory frees up for it. Returns
/// `None` when nothing is leasable for it.
pub async fn lease_in(conn: &mut PgConnection, ask: &LeaseAsk<'_>, classes: &[QueuedClass]) -> Result<Option<LeasedJob>, DbError> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(lease_sql);
    let versions: Vec<i32> = classes.iter().map(|c| c.version).collect();
    let pairs: Vec<i32> = classes.iter().map(|c| c.pair).collect();
    let job = sqlx::query_as::<_, LeasedJob>(sqlx::AssertSqlSafe(SQL.as_str()))
        .bind(Uuid::new_v4())
        .bind(ask.worker)
        .bind(ask.kind.as_str())
        .bind(&versions)
        .bind(ask.lease_secs)
        .bind(&pairs)
        .bind(ask.budget_mib)
        .bind(ask.prover_budget_mib)
        .bind(ask.prover_leases)
        .bind(ask.warm)
        .bind(ask.warm_own)
        .bind(ask.reserve_after_secs)
        .bind(ask.identity)
        .bind(ask.prover_identity)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(job)
}

/// A queued job the dispatch pass may lease to a worker no memory budget binds: what the lease
/// order ([`LEASE_ORDER`]) needs of it, the class it is of, and nothing else.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// `jobs.id`.
    pub id: i64,
    /// Its class.
    pub class: QueuedClass,
    /// `jobs.urgency` (priority plus ageing, seconds; higher first).
    pub urgency: f64,
    /// Its batch (older first among equally urgent jobs).
    pub batch_number: i64,
}

impl Candidate {
    /// The lease order between two candidates for one worker: [`LEASE_ORDER`], with `warm` and
    /// `warm_own` the packed pairs whose setup data is loaded where the job would be proven and
    /// at the worker itself. `Less`: `self` goes first.
    pub fn order(&self, other: &Candidate, warm: &[i32], warm_own: &[i32]) -> std::cmp::Ordering {
        let round = |c: &Candidate| c.class.pair >> 8;
        other
            .urgency
            .total_cmp(&self.urgency)
            .then(self.batch_number.cmp(&other.batch_number))
            .then(round(other).cmp(&round(self)))
            .then(warm.contains(&other.class.pair).cmp(&warm.contains(&self.class.pair)))
            .then(warm_own.contains(&other.class.pair).cmp(&warm_own.contains(&self.class.pair)))
            .then(self.id.cmp(&other.id))
    }
}

/// The first `n` queued jobs of each class of `wants`, each class's in its index order
/// (`jobs_queued_class`), in one statement that reads `n` rows of each class's index range and
/// nothing else. Nothing is locked: [`lease_many`] leases a job only if it is still queued.
pub async fn candidates(conn: &mut PgConnection, wants: &[(QueuedClass, i64)]) -> Result<Vec<Candidate>, DbError> {
    const SQL: &str = formatcp!(
        "SELECT c.ord, j.id, j.urgency, j.batch_number
         FROM unnest($1::text[], $2::int[], $3::int[], $4::bigint[]) WITH ORDINALITY AS c(kind, version, pair, n, ord)
         CROSS JOIN LATERAL (
             SELECT j.id, j.urgency, j.batch_number FROM jobs j
             WHERE j.status = {QUEUED} AND j.kind = c.kind
               AND j.aggregation_round = (c.pair >> 8) AND j.circuit_id = (c.pair & 255)
               AND j.protocol_minor = (c.version >> 16) AND j.protocol_patch = (c.version & 65535)
             ORDER BY j.urgency DESC, j.batch_number, j.id
             LIMIT c.n) j"
    );
    let kinds: Vec<&str> = wants.iter().map(|(c, _)| c.kind.as_str()).collect();
    let versions: Vec<i32> = wants.iter().map(|(c, _)| c.version).collect();
    let pairs: Vec<i32> = wants.iter().map(|(c, _)| c.pair).collect();
    let counts: Vec<i64> = wants.iter().map(|(_, n)| *n).collect();
    let rows: Vec<(i64, i64, f64, i64)> =
        sqlx::query_as(SQL).bind(&kinds).bind(&versions).bind(&pairs).bind(&counts).fetch_all(&mut *conn).await?;
    rows.into_iter()
        .map(|(ord, id, urgency, batch_number)| {
            let (class, _) = usize::try_from(ord - 1).ok().and_then(|i| wants.get(i)).ok_or_else(|| DbError::Invalid(format!("candidate class {ord}")))?;
            Ok(Candidate { id, class: *class, urgency, batch_number })
        })
        .collect()
}

/// One lease of a dispatch pass, for [`lease_many`].
#[derive(Debug, Clone)]
pub struct GrantRow<'a> {
    /// The job (a [`Candidate`]).
    pub job_id: i64,
    /// The new lease (fencing token), chosen by the dispatcher.
    pub lease_id: Uuid,
    /// The worker it goes to (`jobs.leased_to`).
    pub worker: &'a str,
    /// The worker's certificate identity (TLS on): the lease is bound to it.
    pub identity: Option<&'a str>,
    /// The matched prover's certificate identity: it may take the lease over and complete it.
    pub prover_identity: Option<&'a str>,
}

/// Leases every job of `grants` that is still queued, in one statement (one `UPDATE` from
/// `unnest`, its lease rows inserted with it), each for `lease_secs` seconds. Returns the jobs
/// leased (in no particular order); a job that is no longer queued (cancelled, or leased by
/// another scheduler) is left out, and its grant does not exist.
pub async fn lease_many(conn: &mut PgConnection, grants: &[GrantRow<'_>], lease_secs: f64) -> Result<Vec<LeasedJob>, DbError> {
    const SQL: &str = formatcp!(
        "WITH g AS (SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::text[])
                    AS g(id, lease_id, worker, identity, prover_identity)),
         picked AS (
             UPDATE jobs j SET status = {LEASED}, lease_id = g.lease_id, leased_to = g.worker, attempts = j.attempts + 1,
                    lease_deadline = now() + make_interval(secs => $6), leased_at = now()
             FROM g WHERE j.id = g.id AND j.status = {QUEUED}
             RETURNING j.*, g.identity AS grant_identity, g.prover_identity AS grant_prover_identity),
         history AS (INSERT INTO leases (lease_id, job_id, worker, identity, prover_identity)
                     SELECT lease_id, id, leased_to, grant_identity, grant_prover_identity FROM picked)
         SELECT p.id, p.lease_id, p.batch_number, p.kind, p.aggregation_round, p.circuit_id, p.depth,
                p.sequence_number, p.protocol_minor, p.protocol_patch, p.input_key, p.output_key,
                (extract(epoch FROM p.lease_deadline) * 1000)::bigint AS deadline_ms, b.geometry,
                COALESCE(extract(epoch FROM now() - p.queued_at), 0)::float8 AS waited_secs, p.weight_mib
         FROM picked p CROSS JOIN LATERAL (SELECT geometry FROM batches WHERE batch_number = p.batch_number) b"
    );
    let ids: Vec<i64> = grants.iter().map(|g| g.job_id).collect();
    let leases: Vec<Uuid> = grants.iter().map(|g| g.lease_id).collect();
    let workers: Vec<&str> = grants.iter().map(|g| g.worker).collect();
    let identities: Vec<Option<&str>> = grants.iter().map(|g| g.identity).collect();
    let provers: Vec<Option<&str>> = grants.iter().map(|g| g.prover_identity).collect();
    let jobs = sqlx::query_as::<_, LeasedJob>(SQL)
        .bind(&ids)
        .bind(&leases)
        .bind(&workers)
        .bind(&identities)
        .bind(&provers)
        .bind(lease_secs)
        .fetch_all(&mut *conn)
        .await?;
    Ok(jobs)
}

/// The output keys and depths of the inputs of each of `job_ids`, in input order, in one
/// statement. Errors: an input without an output ([`DbError::Invalid`]).
pub async fn inputs_of(conn: &mut PgConnection, job_ids: &[i64]) -> Result<std::collections::HashMap<i64, Vec<(String, i16)>>, DbError> {
    let rows = sqlx::query_as::<_, (i64, Option<String>, i16)>(
        "SELECT ji.job_id, i.output_key, i.depth FROM job_inputs ji JOIN jobs i ON i.id = ji.input_job_id
         WHERE ji.job_id = ANY($1) ORDER BY ji.job_id, ji.position",
    )
    .bind(job_ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut inputs: std::collections::HashMap<i64, Vec<(String, i16)>> = std::collections::HashMap::new();
    for (job, key, depth) in rows {
        let key = key.ok_or_else(|| DbError::Invalid(format!("an input of job {job} has no output")))?;
        inputs.entry(job).or_default().push((key, depth));
    }
    Ok(inputs)
}

/// [`lease_in`] on its own, for tools and benchmarks: reads the queued classes, keeps those
/// `ask`'s versions and pairs allow, and leases (committed at once).
pub async fn lease(pool: &PgPool, ask: &LeaseAsk<'_>) -> Result<Option<LeasedJob>, DbError> {
    let mut conn = pool.acquire().await?;
    let classes = eligible(&queued_classes(&mut conn).await?, ask.kind, ask.versions, ask.pairs);
    if classes.is_empty() {
        return Ok(None);
    }
    lease_in(&mut conn, ask, &classes).await
}

/// Puts a lease that never reached its worker back in the queue, without counting the attempt.
pub async fn unlease<'c>(ex: impl sqlx::PgExecutor<'c>, lease_id: Uuid) -> Result<(), DbError> {
    sqlx::query(
        formatcp!("WITH j AS (UPDATE jobs SET status = {QUEUED}, lease_id = NULL, leased_to = NULL, lease_deadline = NULL,
                                    attempts = attempts - 1, queued_at = now()
                    WHERE lease_id = $1 AND status = {LEASED} RETURNING id)
         UPDATE leases SET outcome = {UNSENT}, ended_at = now() WHERE lease_id = $1 AND outcome IS NULL"),
    )
    .bind(lease_id)
    .execute(ex)
    .await?;
    Ok(())
}
