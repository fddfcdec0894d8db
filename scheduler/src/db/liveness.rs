//! Worker connections and lease deadlines: registration, renewal by heartbeats, detaching a
//! stream that ended, and the deadlines the expiry timer reads.

use const_format::formatcp;
use crate::job_state::lit::{FAILED, HANDED_BACK, LEASED, SUCCEEDED};
use super::*;
use crate::state::MaxLeaseAge;

/// A worker's stream ended: the leases attached to it get at most `grace_secs` more to be
/// re-attached by a reconnecting worker (`Register.held_leases`, heartbeats); after that they
/// expire like any other. Returns how many leases it held.
pub async fn detach_worker(pool: &PgPool, worker: &str, grace_secs: f64) -> Result<u64, DbError> {
    let n = sqlx::query(
        formatcp!("UPDATE jobs SET lease_deadline = least(lease_deadline, now() + make_interval(secs => $2))
         WHERE leased_to = $1 AND status = {LEASED}"),
    )
    .bind(worker)
    .bind(grace_secs)
    .execute(pool)
    .await?
    .rows_affected();
    sqlx::query("UPDATE workers SET disconnected_at = now() WHERE id = $1").bind(worker).execute(pool).await?;
    Ok(n)
}

/// One heartbeat's renewal: `lease` for the connection `worker`; `take_over` when the
/// worker is a prover (it takes over the lease of a witness vector it accepted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewal {
    /// The lease.
    pub lease: Uuid,
    /// The connection that heartbeats it.
    pub worker: String,
    /// A prover's heartbeat: the lease moves to it.
    pub take_over: bool,
}

/// The SQL of a job's longest lease in seconds, by its kind (`jobs.kind`), from `$5` (witness
/// generation), `$6` (proving) and `$7` (compression).
const MAX_AGE: &str = "CASE jobs.kind WHEN 'witness_generation' THEN $5 WHEN 'proving' THEN $6 ELSE $7 END";

/// Renews `renewals` (many workers' heartbeats at once) in one statement: each current lease
/// gets the deadline now + `lease_secs`, but never past its start + `max_age` for its kind
/// (issue 16 rule 1: heartbeats alone never keep a lease for ever). It is also attached to the renewing connection when
/// `take_over`, or when its holder's stream has ended (`workers.disconnected_at`: a reconnected
/// worker re-attaching its leases); a live holder otherwise keeps it, so a WVG's last heartbeat
/// cannot take a lease back from the prover it handed it to. A lease named twice (a WVG and its
/// prover in the same tick) is renewed once, the prover's way. Returns the leases renewed; the
/// others are not current (expired and leased again, or finished), for the caller to revoke.
pub async fn renew_all<'c>(ex: impl sqlx::PgExecutor<'c>, renewals: &[Renewal], lease_secs: f64, max_age: &MaxLeaseAge) -> Result<Vec<Uuid>, DbError> {
    let mut one: std::collections::HashMap<Uuid, &Renewal> = std::collections::HashMap::new();
    for r in renewals {
        let e = one.entry(r.lease).or_insert(r);
        if r.take_over && !e.take_over {
            *e = r;
        }
    }
    let leases: Vec<Uuid> = one.keys().copied().collect();
    let workers: Vec<&str> = leases.iter().map(|l| one[l].worker.as_str()).collect();
    let take_over: Vec<bool> = leases.iter().map(|l| one[l].take_over).collect();
    // Rows another transaction holds (a completion, an expiry) are skipped, not waited for:
    // a renewal of many workers' leases waiting on rows in its own order deadlocked with
    // completion batches (measured by `proofmesh-bench fleet`). A skipped lease is still
    // current ([`spared`]), is not revoked, and the next heartbeat renews it.
    const SQL: &str = formatcp!(
        "WITH r AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::bool[]) AS r(lease_id, worker, take_over)),
         locked AS (SELECT j.id, r.worker, r.take_over FROM jobs j JOIN r ON j.lease_id = r.lease_id
                    WHERE j.status = {LEASED} ORDER BY j.id FOR UPDATE OF j SKIP LOCKED)
         UPDATE jobs SET lease_deadline = LEAST(now() + make_interval(secs => $4),
                                               jobs.leased_at + make_interval(secs => {MAX_AGE})),
                         leased_to = CASE WHEN locked.take_over OR jobs.leased_to IS NULL
                                               OR NOT EXISTS (SELECT 1 FROM workers w
                                                              WHERE w.id = jobs.leased_to AND w.disconnected_at IS NULL)
                                          THEN locked.worker ELSE jobs.leased_to END
         FROM locked WHERE jobs.id = locked.id
         RETURNING jobs.lease_id"
    );
    Ok(sqlx::query_scalar(SQL)
        .bind(&leases)
        .bind(&workers)
        .bind(&take_over)
        .bind(lease_secs)
        .bind(max_age.witness_generation)
        .bind(max_age.proving)
        .bind(max_age.compression)
        .fetch_all(ex)
        .await?)
}

/// The leases among `leases` (not renewed) that must not be revoked: still current (their job
/// row was held by another transaction, so the renewal skipped it), or ended by their holder's
/// own report (succeeded, failed, handed back: a heartbeat that raced its report names them).
pub async fn spared<'c>(ex: impl sqlx::PgExecutor<'c>, leases: &[Uuid]) -> Result<Vec<Uuid>, DbError> {
    const SQL: &str = formatcp!(
        "SELECT lease_id FROM leases WHERE lease_id = ANY($1) AND outcome IN ({SUCCEEDED}, {FAILED}, {HANDED_BACK})
         UNION SELECT lease_id FROM jobs WHERE lease_id = ANY($1) AND status = {LEASED}"
    );
    Ok(sqlx::query_scalar(SQL).bind(leases).fetch_all(ex).await?)
}

/// Records that the connections `workers` were heard from (their heartbeats since the last
/// call): one statement for the whole fleet, once per heartbeat interval
/// ([`crate::liveness`]), instead of a commit per heartbeat.
pub async fn seen<'c>(ex: impl sqlx::PgExecutor<'c>, workers: &[String]) -> Result<(), DbError> {
    sqlx::query("UPDATE workers SET last_seen = now() WHERE id = ANY($1)").bind(workers).execute(ex).await?;
    Ok(())
}

/// A scheduler starts: the connections recorded as open, except `current` (those registered
/// with it already), belong to its predecessor (stopped or killed), whose streams are gone;
/// they are marked ended, so a reconnecting worker's heartbeats re-attach their leases.
/// Returns how many.
pub async fn end_old_connections<'c>(ex: impl sqlx::PgExecutor<'c>, current: &[String]) -> Result<u64, DbError> {
    Ok(sqlx::query("UPDATE workers SET disconnected_at = now() WHERE disconnected_at IS NULL AND NOT (id = ANY($1))")
        .bind(current)
        .execute(ex)
        .await?
        .rows_affected())
}

/// After an outage (the scheduler down, or PostgreSQL unreachable): every current lease gets
/// at least `grace_secs` from now, so its worker can reconnect and renew it before anything
/// expires (issue 16 rule 7: an outage of the cluster costs no attempt). Returns how many
/// deadlines moved.
pub async fn outage_grace<'c>(ex: impl sqlx::PgExecutor<'c>, grace_secs: f64) -> Result<u64, DbError> {
    Ok(sqlx::query(formatcp!(
        "UPDATE jobs SET lease_deadline = now() + make_interval(secs => $1)
         WHERE status = {LEASED} AND lease_deadline < now() + make_interval(secs => $1)"
    ))
    .bind(grace_secs)
    .execute(ex)
    .await?
    .rows_affected())
}

/// A lease whose deadline has passed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DueLease {
    /// The lease.
    pub lease_id: Uuid,
    /// Its job's kind (`jobs.kind`).
    pub kind: String,
    /// Seconds since it was granted (`jobs.leased_at`): compared with [`MaxLeaseAge::of`] its
    /// kind, it tells a lease that reached its longest life from one that missed its heartbeats.
    pub age_secs: f64,
}

/// The leases whose deadline has passed.
pub async fn due_leases<'c>(ex: impl sqlx::PgExecutor<'c>) -> Result<Vec<DueLease>, DbError> {
    Ok(sqlx::query_as(formatcp!(
        "SELECT lease_id, kind, COALESCE(extract(epoch FROM now() - leased_at), 0)::float8 AS age_secs
         FROM jobs WHERE status = {LEASED} AND lease_deadline <= now()"
    ))
    .fetch_all(ex)
    .await?)
}

/// Seconds until the earliest lease deadline (negative if one has passed), or `None` when no
/// job is leased.
pub async fn next_deadline_secs<'c>(ex: impl sqlx::PgExecutor<'c>) -> Result<Option<f64>, DbError> {
    Ok(sqlx::query_scalar(
        formatcp!("SELECT extract(epoch FROM min(lease_deadline) - now())::float8 FROM jobs WHERE status = {LEASED}"),
    )
    .fetch_one(ex)
    .await?)
}

/// Records a worker's registration.
#[allow(clippy::too_many_arguments)]
pub async fn register_worker<'c>(
    ex: impl sqlx::PgExecutor<'c>,
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
    .execute(ex)
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


/// The connection holding `lease`'s job as a proving job (`jobs.leased_to`: the WVG, or the
/// prover once it took the lease over), if the lease is current and its job is a proving job;
/// `None` otherwise (another kind, or not current: the caller's usual checks answer those).
pub async fn proving_holder(pool: &PgPool, lease: Uuid) -> Result<Option<String>, DbError> {
    Ok(sqlx::query_scalar::<_, Option<String>>(formatcp!(
        "SELECT leased_to FROM jobs WHERE lease_id = $1 AND status = {LEASED} AND kind = $2"
    ))
    .bind(lease)
    .bind(crate::graph::JobKind::Proving.as_str())
    .fetch_optional(pool)
    .await?
    .flatten())
}
