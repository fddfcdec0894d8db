//! The lease-expiry timer: one task that sleeps until the earliest lease deadline (or until a
//! deadline may have moved earlier than that: a lease granted while it sleeps with none out or
//! longer than a lease timeout, a worker's stream ended) and then ends every
//! lease past its deadline. A job whose lease expired is queued again with one more attempt, or
//! fails with its batch past `max_attempts` (DESIGN.md section 4). Deadlines live in PostgreSQL,
//! so a restarted scheduler expires what its predecessor leased, but not before every lease has
//! had a full lease timeout (or the reconnect grace, if longer): after the scheduler starts, and
//! after PostgreSQL could not be reached, the first thing the timer does is move every deadline
//! to at least now + that (`db::outage_grace`), so an outage of the cluster costs no attempt. When PostgreSQL first
//! answers, it also marks its predecessor's connections ended (`db::end_old_connections`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::db::{self, DbError, EndReason};
use crate::graph::JobKind;
use crate::job_state::LeaseOutcome;
use crate::state::{LeaseEnd, Shared};

/// Longest sleep with no lease outstanding; a granted lease wakes the timer anyway.
const IDLE: Duration = Duration::from_secs(3600);

/// Runs until `cancel`.
pub async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut predecessor_ended = false;
    loop {
        // Registered before reading the deadline, so a lease granted meanwhile is not missed.
        let moved = shared.deadlines.notified();
        shared.expiry_sleeps_for(None);
        let result = bounded_pass(&shared, &mut predecessor_ended).await;
        let wait = match result {
            Ok(Some(secs)) => Duration::from_secs_f64(secs.max(0.0)) + Duration::from_millis(5),
            Ok(None) => IDLE,
            Err(e) => {
                shared.outage.store(true, Ordering::SeqCst);
                tracing::error!("lease expiry: {e}");
                Duration::from_secs(1)
            }
        };
        shared.expiry_sleeps_for(Some(wait));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = moved => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// [`pass`] on one connection, never longer than the pass deadline
/// (`Settings::db_pass_deadline`): a connection that stops answering must not stop expiry; it
/// is closed, and the next pass starts on a new one.
async fn bounded_pass(shared: &Shared, predecessor_ended: &mut bool) -> Result<Option<f64>, DbError> {
    let deadline = shared.settings.db_pass_deadline;
    let mut conn = db::pass_connection(&shared.pool, deadline).await?;
    match tokio::time::timeout(deadline, pass(shared, &mut conn, predecessor_ended)).await {
        Ok(result) => result,
        Err(_) => Err(db::abandon(conn, deadline)),
    }
}

/// One pass: the predecessor's connections ended (once, when PostgreSQL first answers), the
/// outage grace if due, the due leases expired. Returns the seconds until the next deadline
/// (`None`: no lease out).
async fn pass(shared: &Shared, conn: &mut sqlx::PgConnection, predecessor_ended: &mut bool) -> Result<Option<f64>, DbError> {
    if !*predecessor_ended {
        let current = shared.registry().ids();
        db::end_old_connections(&mut *conn, &current).await?;
        *predecessor_ended = true;
    }
    after_outage(shared, conn).await?;
    expire_due(shared, conn).await?;
    db::next_deadline_secs(conn).await
}

/// After an outage ([`Shared::outage`]: this scheduler just started, or PostgreSQL did not
/// answer a renewal or this timer), gives every lease a lease timeout (at least the reconnect
/// grace) before anything expires: the workers were heartbeating into a scheduler or a database that was not there.
/// The flag is cleared only once the grace is written (the caller sets it again on any error).
async fn after_outage(shared: &Shared, conn: &mut sqlx::PgConnection) -> Result<(), DbError> {
    if !shared.outage.swap(false, Ordering::SeqCst) {
        return Ok(());
    }
    // A full lease timeout (or the reconnect grace, if longer): the workers come back on their
    // reconnect backoff (up to 5 s, jittered), which a short grace would not wait for
    // (`make chaos --short`, 2 s of grace, spent attempts so). On an error the caller sets the
    // flag again.
    let grace = shared.settings.reconnect_grace_secs.max(shared.settings.lease_secs);
    let n = db::outage_grace(conn, grace).await?;
    if n > 0 {
        tracing::info!(leases = n, "after an outage, every lease has {grace:.0} s to be renewed before it can expire");
    }
    Ok(())
}

/// Ends every lease past its deadline; revokes it on the stream that still holds it (a hung worker).
async fn expire_due(shared: &Shared, conn: &mut sqlx::PgConnection) -> Result<(), DbError> {
    let due = db::due_leases(&mut *conn).await?;
    if due.is_empty() {
        return Ok(());
    }
    let silent = format!(
        "lease expired: no heartbeat within {:.0} s, or its worker's stream ended and it did not reconnect within {:.0} s",
        shared.settings.lease_secs, shared.settings.reconnect_grace_secs
    );
    for db::DueLease { lease_id: lease, kind, age_secs } in due {
        let max_age = JobKind::parse(&kind).map(|k| shared.settings.max_lease_age.of(k));
        let too_old = max_age.filter(|&max| age_secs >= max).map(|max| {
            format!(
                "lease expired at its maximum age of {max:.0} s ({kind}) although its worker heartbeats: its stage hangs or is far \
                 slower than it should be"
            )
        });
        let reason = too_old.as_deref().unwrap_or(&silent);
        let ended = match db::end_lease(&mut *conn, lease, reason, true, EndReason::Expired).await {
            Ok(Some(ended)) => ended,
            // Renewed or finished since it was read.
            Ok(None) | Err(DbError::StaleLease(_)) => continue,
            Err(e) => return Err(e),
        };
        tracing::warn!(%lease, holder = ended.holder.as_deref().unwrap_or(""), job_failed = ended.job_failed, "{reason}");
        shared.apply(LeaseEnd {
            outcome: LeaseOutcome::Expired,
            lease: Some(lease),
            job: &ended.job,
            batch: ended.batch_number,
            taken_from: Some((ended.holder.as_deref(), reason)),
        });
    }
    Ok(())
}
