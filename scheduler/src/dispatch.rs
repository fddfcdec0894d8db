//! The dispatcher: one task that hands queued jobs to workers with credits, over their `Work`
//! streams, as soon as both exist. It sleeps on [`Shared::wake`] and never polls the database:
//! everything that can make a lease possible (a job queued, a credit, a freed prover slot, a new
//! worker) wakes it. One task means leases go out one SQL statement at a time, in priority order.

use std::sync::Arc;

use proofmesh_proto::v1::{self, scheduler_message, Role};
use tokio_util::sync::CancellationToken;

use crate::db::{self, LeasedJob};
use crate::graph::JobKind;
use crate::state::Shared;

/// Runs until `cancel`.
pub async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        if let Err(e) = dispatch_all(&shared).await {
            tracing::error!("dispatch: {e}");
            // A database error: try again on the next wake-up (or shortly, so nothing stalls).
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            shared.wake_dispatcher();
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// The job kind a role leases, if it leases any.
fn kind_of(role: Role) -> Option<JobKind> {
    match role {
        Role::WitnessGenerator => Some(JobKind::WitnessGeneration),
        Role::Wvg => Some(JobKind::Proving),
        Role::Compressor => Some(JobKind::Compression),
        Role::Prover | Role::Unspecified => None,
    }
}

/// Leases until no worker with credits finds a job: one lease per worker per pass, so workers
/// share the queue fairly.
async fn dispatch_all(shared: &Shared) -> Result<(), db::DbError> {
    loop {
        let mut leased_any = false;
        let ready = shared.registry().ready();
        for worker in ready {
            leased_any |= dispatch_one(shared, &worker).await?;
        }
        if !leased_any {
            return Ok(());
        }
    }
}

/// Tries to lease one job to `worker`. Returns whether it did.
async fn dispatch_one(shared: &Shared, worker: &str) -> Result<bool, db::DbError> {
    // Decide under the lock what to ask for; never hold it across the database call.
    let (kind, versions, pairs, prover) = {
        let reg = shared.registry();
        let Some(conn) = reg.get(worker) else { return Ok(false) };
        let Some(kind) = kind_of(conn.role) else { return Ok(false) };
        let prover = if conn.role == Role::Wvg {
            match reg.pick_prover(conn, shared.settings.zone_policy) {
                Some(p) => {
                    let p = reg.get(&p).expect("picked from the registry");
                    Some((p.id.clone(), p.prover_endpoint.clone(), p.versions.clone(), p.pairs.clone()))
                }
                None => return Ok(false),
            }
        } else {
            None
        };
        // A WVG lease must suit both the WVG and its prover.
        let versions = match &prover {
            Some((_, _, pv, _)) if conn.versions.is_empty() => pv.clone(),
            Some((_, _, pv, _)) if !pv.is_empty() => conn.versions.iter().copied().filter(|v| pv.contains(v)).collect(),
            _ => conn.versions.clone(),
        };
        if !conn.versions.is_empty() && versions.is_empty() {
            return Ok(false);
        }
        // ... and both prover groups (pick_prover only picks a prover that shares a pair).
        let pairs = match &prover {
            Some((_, _, _, pp)) => match crate::groups::intersect(&conn.pairs, pp) {
                Some(p) => p,
                None => return Ok(false),
            },
            None => conn.pairs.clone(),
        };
        (kind, versions, pairs, prover)
    };
    let Some(job) = db::lease(&shared.pool, kind, worker, &versions, &pairs, shared.settings.lease_secs).await? else {
        return Ok(false);
    };
    let inputs = match kind {
        JobKind::WitnessGeneration if job.job.aggregation_round > 0 => db::input_artifacts(&shared.pool, job.id).await?,
        _ => job.input_key.clone().map(|k| vec![(k, 0)]).unwrap_or_default(),
    };
    let mut lease = lease_message(&job, inputs);
    let sent = {
        let mut reg = shared.registry();
        if let Some((id, endpoint, _, _)) = &prover {
            lease.prover_endpoint = endpoint.clone();
            lease.prover_worker_id = id.clone();
            reg.hold_slot(id, job.lease_id);
        }
        match reg.get_mut(worker) {
            Some(conn) if conn.credits > 0 => {
                conn.credits -= 1;
                let msg = v1::SchedulerMessage { msg: Some(scheduler_message::Msg::Lease(lease)) };
                conn.outbox.try_send(Ok(msg)).is_ok()
            }
            _ => false,
        }
    };
    if !sent {
        // The worker left (or its stream is full) between picking and sending: put it back.
        shared.registry().free_slot(job.lease_id);
        db::unlease(&shared.pool, job.lease_id).await?;
        return Ok(false);
    }
    tracing::debug!(worker, job = job.id, lease = %job.lease_id, "leased");
    crate::telemetry::leased(&job.job.kind, job.waited_secs);
    shared.deadlines.notify_one();
    shared.batch_changed(job.job.batch_number);
    Ok(true)
}

/// The `Lease` message for a leased job.
fn lease_message(job: &LeasedJob, inputs: Vec<(String, i16)>) -> v1::Lease {
    let geometry = db::geometry_from_row(&job.geometry).map(v1::Geometry::from).ok();
    v1::Lease {
        lease_id: job.lease_id.to_string(),
        job: Some(job.job.to_proto()),
        protocol_version: Some(job.job.version()),
        geometry,
        deadline_unix_ms: job.deadline_ms as u64,
        input_depths: inputs.iter().map(|(_, d)| *d as u32).collect(),
        input_keys: inputs.into_iter().map(|(k, _)| k).collect(),
        output_key: job.output_key.clone().unwrap_or_default(),
        prover_endpoint: String::new(),
        prover_worker_id: String::new(),
    }
}
