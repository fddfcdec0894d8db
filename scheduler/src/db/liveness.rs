//! Worker connections and lease deadlines: registration, renewal by heartbeats, detaching a
//! stream that ended, and the deadlines the expiry timer reads.

use const_format::formatcp;
use crate::job_state::lit::{LEASED};
use super::*;

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

/// Renews `leases` for the connection `worker`: each current one gets the deadline now +
/// `lease_secs`. It is also attached to `worker` when `take_over` (a prover taking over the
/// lease of a witness vector it accepted) or when its holder's stream has ended
/// (`workers.disconnected_at`: a reconnected worker re-attaching its leases); a live holder
/// otherwise keeps it, so a WVG's last heartbeat cannot take a lease back from the prover it
/// handed it to. One statement. Returns the leases that are not current (stale: expired and
/// leased again, or finished), for the caller to revoke.
pub async fn renew(pool: &PgPool, worker: &str, leases: &[Uuid], lease_secs: f64, take_over: bool) -> Result<Vec<Uuid>, DbError> {
    let renewed: Vec<Uuid> = sqlx::query_scalar(
        formatcp!("UPDATE jobs SET lease_deadline = now() + make_interval(secs => $3),
                         leased_to = CASE WHEN $4 OR leased_to IS NULL
                                               OR NOT EXISTS (SELECT 1 FROM workers w
                                                              WHERE w.id = jobs.leased_to AND w.disconnected_at IS NULL)
                                          THEN $1 ELSE leased_to END
         WHERE lease_id = ANY($2) AND status = {LEASED}
         RETURNING lease_id"),
    )
    .bind(worker)
    .bind(leases)
    .bind(lease_secs)
    .bind(take_over)
    .fetch_all(pool)
    .await?;
    Ok(leases.iter().copied().filter(|l| !renewed.contains(l)).collect())
}

/// Records that the connections `workers` were heard from (their heartbeats since the last
/// call): one statement for the whole fleet, once per heartbeat interval
/// ([`crate::liveness`]), instead of a commit per heartbeat.
pub async fn seen(pool: &PgPool, workers: &[String]) -> Result<(), DbError> {
    sqlx::query("UPDATE workers SET last_seen = now() WHERE id = ANY($1)").bind(workers).execute(pool).await?;
    Ok(())
}

/// A scheduler starts: the connections recorded as open, except `current` (those registered
/// with it already), belong to its predecessor (stopped or killed), whose streams are gone;
/// they are marked ended, so a reconnecting worker's heartbeats re-attach their leases.
/// Returns how many.
pub async fn end_old_connections(pool: &PgPool, current: &[String]) -> Result<u64, DbError> {
    Ok(sqlx::query("UPDATE workers SET disconnected_at = now() WHERE disconnected_at IS NULL AND NOT (id = ANY($1))")
        .bind(current)
        .execute(pool)
        .await?
        .rows_affected())
}

/// The leases whose deadline has passed.
pub async fn due_leases(pool: &PgPool) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar(formatcp!("SELECT lease_id FROM jobs WHERE status = {LEASED} AND lease_deadline <= now()"))
        .fetch_all(pool)
        .await?)
}

/// Seconds until the earliest lease deadline (negative if one has passed), or `None` when no
/// job is leased.
pub async fn next_deadline_secs(pool: &PgPool) -> Result<Option<f64>, DbError> {
    Ok(sqlx::query_scalar(
        formatcp!("SELECT extract(epoch FROM min(lease_deadline) - now())::float8 FROM jobs WHERE status = {LEASED}"),
    )
    .fetch_one(pool)
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

