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

/// What the dispatcher knows of a worker (and, for a WVG, its matched prover) when it asks for a
/// lease: read under the registry's lock, used after it.
struct Ask {
    kind: JobKind,
    versions: Vec<i32>,
    pairs: Vec<i32>,
    warm: Vec<i32>,
    warm_own: Vec<i32>,
    budget_mib: i64,
    prover: Option<MatchedProver>,
    /// The worker's certificate subject (TLS on).
    identity: Option<String>,
}

/// The prover matched with a WVG lease.
struct MatchedProver {
    id: String,
    identity: Option<String>,
    endpoint: String,
    budget_mib: i64,
    slot_leases: Vec<uuid::Uuid>,
}

/// Decides, under the registry's lock, what to ask the database for on `worker`'s behalf; `None`
/// when it can take nothing now (not a leasing role, or a WVG without a compatible free prover).
fn ask_for(shared: &Shared, worker: &str) -> Option<Ask> {
    let reg = shared.registry();
    let conn = reg.get(worker).filter(|c| !c.quarantined)?;
    let kind = kind_of(conn.role)?;
    let budget = |mib: u64| i64::try_from(mib).unwrap_or(i64::MAX);
    let affinity = shared.settings.policy.setup_affinity;
    let mut ask = Ask {
        kind,
        versions: conn.versions.clone(),
        pairs: conn.pairs.clone(),
        warm: if affinity { conn.loaded_setups.clone() } else { vec![] },
        warm_own: vec![],
        budget_mib: budget(conn.memory_budget_mib),
        prover: None,
        identity: conn.identity.clone(),
    };
    if conn.role == Role::Wvg {
        // pick_prover only picks a prover that shares a version and a pair with the WVG.
        let p = reg.get(&reg.pick_prover(conn, shared.settings.zone_policy)?).expect("picked from the registry");
        // A WVG lease must suit both the WVG and its prover ...
        if !p.versions.is_empty() {
            ask.versions = if conn.versions.is_empty() {
                p.versions.clone()
            } else {
                conn.versions.iter().copied().filter(|v| p.versions.contains(v)).collect()
            };
        }
        ask.pairs = crate::groups::intersect(&conn.pairs, &p.pairs)?;
        // ... and the setup data that counts is the prover's (proving is the heavy part).
        if affinity {
            ask.warm_own = std::mem::take(&mut ask.warm);
            ask.warm = p.loaded_setups.clone();
        }
        ask.prover = Some(MatchedProver {
            id: p.id.clone(),
            identity: p.identity.clone(),
            endpoint: p.prover_endpoint.clone(),
            budget_mib: budget(p.memory_budget_mib),
            slot_leases: reg.slot_leases(&p.id),
        });
    }
    Some(ask)
}

/// Tries to lease one job to `worker`. Returns whether it did.
async fn dispatch_one(shared: &Shared, worker: &str) -> Result<bool, db::DbError> {
    // Decide under the lock what to ask for; never hold it across the database call.
    let Some(ask) = ask_for(shared, worker) else { return Ok(false) };
    let policy = &shared.settings.policy;
    let request = db::LeaseAsk {
        kind: ask.kind,
        worker,
        versions: &ask.versions,
        pairs: &ask.pairs,
        lease_secs: shared.settings.lease_secs,
        warm: &ask.warm,
        warm_own: &ask.warm_own,
        budget_mib: ask.budget_mib,
        prover_budget_mib: ask.prover.as_ref().map_or(0, |p| p.budget_mib),
        prover_leases: ask.prover.as_ref().map_or(&[], |p| &p.slot_leases),
        reserve_after_secs: policy.reserve_after_secs,
        identity: ask.identity.as_deref(),
        prover_identity: ask.prover.as_ref().and_then(|p| p.identity.as_deref()),
    };
    let Some(job) = db::lease(&shared.pool, &request).await? else {
        return Ok(false);
    };
    let kind = ask.kind;
    let prover = ask.prover;
    let inputs = match kind {
        JobKind::WitnessGeneration if job.job.aggregation_round > 0 => db::input_artifacts(&shared.pool, job.id).await?,
        _ => job.input_key.clone().map(|k| vec![(k, 0)]).unwrap_or_default(),
    };
    let mut lease = lease_message(&job, inputs);
    let sent = {
        let mut reg = shared.registry();
        if let Some(p) = &prover {
            lease.prover_endpoint = p.endpoint.clone();
            lease.prover_worker_id = p.id.clone();
            reg.hold_slot(&p.id, job.lease_id);
            if let (Some(wvg), Some(conn)) = (&ask.identity, reg.get(&p.id)) {
                // TLS on: the prover accepts this witness vector from the WVG's identity only.
                // Sent before the lease, on the prover's own stream; if it is lost the push is
                // refused and the WVG reports a retryable failure.
                let expect = v1::ExpectWitnessVector { lease_id: job.lease_id.to_string(), wvg_identity: wvg.clone() };
                let _ = conn.outbox.try_send(Ok(v1::SchedulerMessage { msg: Some(scheduler_message::Msg::ExpectWitnessVector(expect)) }));
            }
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
