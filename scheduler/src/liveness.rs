//! Liveness: heartbeats cost the fleet one statement per tick, not one per worker.
//!
//! - Lease renewals: a heartbeat that names leases queues them ([`Shared::queue_renewals`]);
//!   every [`RENEW_EVERY`] this task renews everything queued in one statement
//!   (`db::renew_all`), holds the prover slots of what provers took over, and revokes on each
//!   connection what was not current. A lease lives `--lease-timeout-secs`, many heartbeats and
//!   far more than a tick, so the tick's delay costs nothing.
//! - Last seen: a heartbeat notes its connection in memory ([`Shared::heard_from`]); once per
//!   heartbeat interval the connections heard from are written to `workers.last_seen`
//!   (read by `Admin.ListWorkers`) in one statement. 1,000 idle workers cost one statement per
//!   interval, not 1,000 commits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{self, DbError, Renewal};
use crate::state::Shared;

/// How often queued renewals are written.
pub const RENEW_EVERY: Duration = Duration::from_millis(50);

/// Runs until `cancel`.
pub async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let seen_every = Duration::from_millis(u64::from(shared.settings.heartbeat_ms.max(10)));
    let mut seen_at = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RENEW_EVERY) => {}
            _ = cancel.cancelled() => return,
        }
        renew_queued(&shared).await;
        if seen_at.elapsed() >= seen_every {
            seen_at = Instant::now();
            record(&shared).await;
        }
    }
}

/// Renews the queued renewals in one statement. On an error they are dropped, not kept: the
/// next heartbeat names the same leases again, well before their deadline (so an outage of
/// PostgreSQL cannot grow the queue without bound).
pub async fn renew_queued(shared: &Shared) {
    let queued = std::mem::take(&mut *shared.renewals.lock().unwrap_or_else(|e| e.into_inner()));
    if queued.is_empty() {
        return;
    }
    match renew(shared, &queued).await {
        Ok((renewed, spared)) => renewed_effects(shared, &queued, &renewed, &spared),
        Err(e) => {
            // Their deadlines may pass before PostgreSQL answers again: not the workers' fault.
            shared.outage.store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::warn!(renewals = queued.len(), "renewing leases: {e} (the next heartbeats renew them)")
        }
    }
}

/// Renews one connection's `leases` now (a registration re-attaching what it holds). Returns
/// the leases that are not current (revoked there).
pub async fn renew_now(shared: &Shared, worker: &str, leases: &[Uuid], take_over: bool) -> Result<Vec<Uuid>, DbError> {
    let requested: Vec<Renewal> = leases.iter().map(|&lease| Renewal { lease, worker: worker.to_string(), take_over }).collect();
    let (renewed, spared) = renew(shared, &requested).await?;
    renewed_effects(shared, &requested, &renewed, &spared);
    Ok(leases.iter().copied().filter(|l| !renewed.contains(l)).collect())
}

/// Renews `requested` on one connection within the pass deadline (`Settings::db_pass_deadline`;
/// past it the connection is closed, as it may be half-open). Returns the leases renewed, and
/// among the others those to spare ([`db::spared`]: still current, or reported by their holder).
async fn renew(shared: &Shared, requested: &[Renewal]) -> Result<(Vec<Uuid>, Vec<Uuid>), DbError> {
    let deadline = shared.settings.db_pass_deadline;
    let mut conn = db::pass_connection(&shared.pool, deadline).await?;
    let pass = async {
        let renewed = db::renew_all(&mut *conn, requested, shared.settings.lease_secs, &shared.settings.max_lease_age).await?;
        let not_current: Vec<Uuid> = requested.iter().map(|r| r.lease).filter(|l| !renewed.contains(l)).collect();
        let spared = if not_current.is_empty() { vec![] } else { db::spared(&mut *conn, &not_current).await? };
        Ok::<_, DbError>((renewed, spared))
    };
    match tokio::time::timeout(deadline, pass).await {
        Ok(result) => result,
        Err(_) => Err(db::abandon(conn, deadline)),
    }
}

/// After a renewal: a prover's renewed leases hold its slots (whatever the registry believed:
/// it is rebuilt after a scheduler restart); a lease that was not current is revoked on the
/// connection that named it, unless it is `spared` (still current: another transaction held its
/// row; or its holder reported it meanwhile: a heartbeat queued just before the report).
fn renewed_effects(shared: &Shared, requested: &[Renewal], renewed: &[Uuid], spared: &[Uuid]) {
    let renewed: std::collections::HashSet<&Uuid> = renewed.iter().collect();
    for r in requested {
        if renewed.contains(&r.lease) {
            if r.take_over {
                shared.registry().hold_slot(&r.worker, r.lease);
            }
        } else if !spared.contains(&r.lease) {
            tracing::warn!(worker = r.worker, lease = %r.lease, "heartbeat for a lease that is not current: revoked");
            shared.revoke(&r.worker, r.lease, "lease not current: it expired and the job was leased again, or it finished");
        }
    }
}

/// Writes the connections heard from since the last call (kept for the next call on an error).
pub async fn record(shared: &Shared) {
    let heard: Vec<String> = shared.heard.lock().unwrap_or_else(|e| e.into_inner()).drain().collect();
    if heard.is_empty() {
        return;
    }
    let deadline = shared.settings.db_pass_deadline;
    let seen = async {
        let mut conn = db::pass_connection(&shared.pool, deadline).await?;
        match tokio::time::timeout(deadline, db::seen(&mut *conn, &heard)).await {
            Ok(result) => result,
            Err(_) => Err(db::abandon(conn, deadline)),
        }
    };
    if let Err(e) = seen.await {
        tracing::warn!("recording heartbeats: {e}");
        shared.heard.lock().unwrap_or_else(|e| e.into_inner()).extend(heard);
    }
}
