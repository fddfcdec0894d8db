//! `Scheduler.Work`: one bidirectional stream per worker. The worker registers (re-attaching the
//! leases it still works on after a reconnect), grants credits, heartbeats the leases it holds and
//! reports completions and failures; the scheduler answers with leases (pushed by the dispatcher),
//! `Recorded` or `Refused` for each report, and `Revoke` for a lease that is no longer the
//! worker's. A report that hits a database error ends the stream: the worker reconnects and sends
//! it again, so no report is lost to a PostgreSQL restart.

use std::pin::Pin;
use std::sync::Arc;

use proofmesh_core::CircuitId;
use proofmesh_proto::v1::{self, scheduler_message, worker_message, Role};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::batches::internal;
use crate::db::{self, DbError, EndReason};
use crate::registry::{Conn, Outbox};
use crate::job_state::LeaseOutcome;
use crate::state::{LeaseEnd, Shared};

/// The `Scheduler` service.
#[derive(Debug, Clone)]
pub struct WorkService {
    shared: Arc<Shared>,
    /// Scheduler shutdown: streams end, and their leases are left as they are for the next
    /// scheduler (the workers re-attach them).
    shutdown: CancellationToken,
}

impl WorkService {
    /// The service over `shared`, until `shutdown`.
    pub fn new(shared: Arc<Shared>, shutdown: CancellationToken) -> Self {
        WorkService { shared, shutdown }
    }
}

type SchedulerStream = Pin<Box<dyn Stream<Item = Result<v1::SchedulerMessage, Status>> + Send>>;

/// Room for the messages in flight to one worker (leases never exceed its credits).
const OUTBOX_DEPTH: usize = 1024;

/// A role as workers, logs and metrics name it (`witness-generator`, `wvg`, `prover`, `compressor`).
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::WitnessGenerator => "witness-generator",
        Role::Wvg => "wvg",
        Role::Prover => "prover",
        Role::Compressor => "compressor",
        Role::Unspecified => "unspecified",
    }
}

#[tonic::async_trait]
impl v1::scheduler_server::Scheduler for WorkService {
    type WorkStream = SchedulerStream;

    async fn work(&self, request: Request<Streaming<v1::WorkerMessage>>) -> Result<Response<SchedulerStream>, Status> {
        let identity = proofmesh_proto::peer_identity(&request).map(|i| i.subject().to_string());
        if identity.is_none() && self.shared.settings.tls.enabled() {
            return Err(Status::unauthenticated("no client certificate"));
        }
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.and_then(|m| m.msg);
        let Some(worker_message::Msg::Register(reg)) = first else {
            return Err(Status::invalid_argument("the first message on a Work stream must be Register"));
        };
        let role = Role::try_from(reg.role).unwrap_or(Role::Unspecified);
        if role == Role::Unspecified {
            return Err(Status::invalid_argument("Register.role is required"));
        }
        if role == Role::Prover && reg.prover_endpoint.is_empty() {
            return Err(Status::invalid_argument("a prover must register its prover_endpoint"));
        }
        let max = self.shared.settings.max_worker_capacity;
        if reg.capacity == 0 || reg.capacity > max {
            return Err(Status::invalid_argument(format!(
                "capacity {} is outside 1..={max} (the scheduler's --max-worker-capacity)",
                reg.capacity
            )));
        }
        let pairs = match (reg.prover_group, &self.shared.settings.prover_groups) {
            (None, _) => vec![],
            (Some(g), _) if role != Role::Wvg && role != Role::Prover => {
                return Err(Status::invalid_argument(format!(
                    "prover group {g}: groups are for WVGs and provers; a {} takes every job of its kind",
                    role_name(role)
                )))
            }
            (Some(g), None) => {
                return Err(Status::invalid_argument(format!(
                    "prover group {g} requested, but this scheduler has no --prover-groups file"
                )))
            }
            (Some(g), Some(groups)) => groups.pairs(g).ok_or_else(|| {
                Status::invalid_argument(format!("unknown prover group {g}: the scheduler's groups are {:?}", groups.ids()))
            })?,
        };
        let versions = reg
            .protocol_versions
            .iter()
            .map(|v| v.to_core().ok_or_else(|| Status::invalid_argument("a protocol version's minor and patch are below 65536")))
            .collect::<Result<Vec<_>, _>>()?;
        let id = format!("{}-{}", role_name(role), &Uuid::new_v4().simple().to_string()[..12]);
        let name = if reg.name.is_empty() { id.clone() } else { reg.name.clone() };
        let endpoint = (!reg.prover_endpoint.is_empty()).then_some(reg.prover_endpoint.as_str());
        // On one connection, within the pass deadline: a database that stops answering fails
        // the registration (the worker tries again) instead of holding it for ever.
        let deadline = self.shared.settings.db_pass_deadline;
        let mut conn = db::pass_connection(&self.shared.pool, deadline).await.map_err(internal)?;
        let recorded = async {
            if !versions.is_empty() {
                let known = db::known_versions(&mut *conn).await?;
                if let Some(v) = versions.iter().find(|v| !known.contains(&(i32::from(v.minor), i32::from(v.patch)))) {
                    return Ok(Err(Status::invalid_argument(format!(
                        "protocol version {v} is not registered with this scheduler (Admin.ListProtocolVersions; \
                         an operator registers it with Admin.RegisterProtocolVersion)"
                    ))));
                }
            }
            db::register_worker(
                &mut *conn,
                &id,
                &name,
                role_name(role),
                &reg.zone,
                &reg.region,
                &reg.host,
                reg.capacity,
                endpoint,
                identity.as_deref(),
            )
            .await?;
            Ok::<_, DbError>(Ok(db::holds(&mut *conn, &name).await?))
        };
        let (quarantined, drained) = match tokio::time::timeout(deadline, recorded).await {
            Ok(result) => result.map_err(internal)??,
            Err(_) => return Err(internal(db::abandon(conn, deadline))),
        };
        drop(conn);

        if quarantined {
            tracing::warn!(worker = %id, name, "registered while quarantined: it gets nothing until Admin.ReleaseWorker");
        }
        if drained {
            tracing::warn!(worker = %id, name, "registered while drained by an operator: it gets nothing until Admin.ReleaseWorker");
        }
        let (outbox, rx) = mpsc::channel(OUTBOX_DEPTH);
        let registered = v1::Registered { worker_id: id.clone(), heartbeat_interval_ms: self.shared.settings.heartbeat_ms };
        outbox
            .try_send(Ok(v1::SchedulerMessage { msg: Some(scheduler_message::Msg::Registered(registered)) }))
            .map_err(|_| Status::internal("worker outbox closed"))?;
        // A reconnect of a process whose old stream this scheduler still holds (half-open: the
        // worker saw it die, the scheduler did not): that stream is ended now, not when its TCP
        // keepalive gives up, and no lease goes into it meanwhile (issue 16 rule 7).
        let replaced = self.shared.registry().replace_instance(&reg.instance_id, identity.as_deref());
        for (old, token) in replaced {
            tracing::info!(worker = %id, replaced = %old, name, "a reconnect of the same worker process: its old stream is ended");
            token.cancel();
        }
        let ended = CancellationToken::new();
        self.shared.registry().add(Conn {
            id: id.clone(),
            name: name.clone(),
            role,
            zone: reg.zone.clone(),
            region: reg.region.clone(),
            host: reg.host.clone(),
            capacity: reg.capacity,
            prover_endpoint: reg.prover_endpoint.clone(),
            versions: versions.iter().map(|v| v.packed() as i32).collect(),
            prover_group: reg.prover_group,
            pairs,
            memory_budget_mib: reg.memory_budget_mib,
            loaded_setups: crate::groups::pack_all(&reg.loaded_setups),
            credits: 0,
            held: Default::default(),
            slots_used: 0,
            reported_busy: 0,
            draining: false,
            drained,
            identity: identity.clone(),
            quarantined,
            outbox: outbox.clone(),
            instance: reg.instance_id.clone(),
            ended: ended.clone(),
        });
        let held = parse_leases(&reg.held_leases);
        if !held.is_empty() {
            // Re-attach: the leases still current become this stream's; a prover's hold its slots again.
            let stale = renew(&self.shared, &id, identity.as_deref(), &held, true).await.map_err(internal)?;
            let mut reg = self.shared.registry();
            for lease in held.iter().filter(|l| !stale.contains(l)) {
                reg.hold_lease(&id, *lease);
            }
            drop(reg);
            tracing::info!(worker = %id, reattached = held.len() - stale.len(), revoked = stale.len(), "leases re-attached");
        }
        tracing::info!(worker = %id, name, role = role_name(role), zone = reg.zone, host = reg.host, identity = identity.as_deref().unwrap_or(""), "registered");
        self.shared.wake_for_capacity();

        let (shared, shutdown) = (self.shared.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            let end = tokio::select! {
                end = serve_worker(&shared, &id, identity.as_deref(), &mut inbound, &outbox) => end,
                _ = shutdown.cancelled() => "scheduler shutting down".to_string(),
                _ = ended.cancelled() => "replaced by a reconnect of the same worker process".to_string(),
            };
            shared.registry().remove(&id);
            if !shutdown.is_cancelled() {
                match db::detach_worker(&shared.pool, &id, shared.settings.reconnect_grace_secs).await {
                    Ok(n) if n > 0 => {
                        tracing::info!(worker = %id, leases = n, "its leases expire unless re-attached within {:.0} s", shared.settings.reconnect_grace_secs);
                        shared.deadlines.notify_one();
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(worker = %id, "detaching its leases: {e}"),
                }
            }
            tracing::info!(worker = %id, "disconnected: {end}");
            shared.wake_for_capacity();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Renews `leases` for connection `id` (a prover takes them over): at once when `now` (a
/// registration re-attaching them; returns the leases not current), else at the next tick of
/// [`crate::liveness`] (a heartbeat). Either way, the leases bound to another identity than the
/// connection's `identity` are revoked first and not renewed (returned too).
async fn renew(shared: &Shared, id: &str, identity: Option<&str>, leases: &[Uuid], now: bool) -> Result<Vec<Uuid>, DbError> {
    let foreign = match identity {
        Some(identity) if !leases.is_empty() => db::foreign_leases(&shared.pool, leases, identity).await?,
        _ => vec![],
    };
    for lease in &foreign {
        tracing::warn!(worker = id, %lease, identity, "heartbeat for a lease bound to another identity: refused");
        shared.revoke(id, *lease, "this lease is bound to another worker's certificate identity");
    }
    let leases: Vec<Uuid> = leases.iter().copied().filter(|l| !foreign.contains(l)).collect();
    if leases.is_empty() {
        return Ok(foreign);
    }
    let take_over = shared.registry().get(id).is_some_and(|c| c.role == Role::Prover);
    if !now {
        shared.queue_renewals(id, &leases, take_over);
        return Ok(foreign);
    }
    let stale = crate::liveness::renew_now(shared, id, &leases, take_over).await?;
    Ok(stale.into_iter().chain(foreign).collect())
}

fn parse_leases(ids: &[String]) -> Vec<Uuid> {
    ids.iter().filter_map(|s| Uuid::parse_str(s).ok()).collect()
}

/// Handles one worker's messages until its stream ends. Returns why it ended.
async fn serve_worker(
    shared: &Shared,
    id: &str,
    identity: Option<&str>,
    inbound: &mut Streaming<v1::WorkerMessage>,
    outbox: &Outbox,
) -> String {
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m.msg,
            Ok(None) => return "stream closed".into(),
            Err(e) => return format!("stream error: {e}"),
        };
        match msg {
            Some(worker_message::Msg::Credit(c)) => {
                // Kept while an operator's drain holds (it may be released); not once the
                // worker itself drains (it is leaving).
                if let Some(conn) = shared.registry().get_mut(id).filter(|c| !c.draining) {
                    // Never more than its capacity: a worker cannot take the whole queue by
                    // sending credits it does not have.
                    conn.credits = conn.credits.saturating_add(c.n).min(conn.capacity);
                }
                shared.wake_for_capacity();
            }
            Some(worker_message::Msg::Heartbeat(mut h)) => {
                let mut freed = false;
                if let Some(conn) = shared.registry().get_mut(id) {
                    // A worker holds at most its capacity in leases (a prover: in slots), so a
                    // heartbeat names no more: the rest are not renewed, nor answered one
                    // `Revoke` each (issue 17: inputs bounded before they cost).
                    if h.lease_ids.len() > conn.capacity as usize {
                        tracing::warn!(worker = %id, named = h.lease_ids.len(), capacity = conn.capacity, "a heartbeat named more leases than its capacity: only the first are renewed");
                        h.lease_ids.truncate(conn.capacity as usize);
                    }
                    conn.loaded_setups = crate::groups::pack_all(&h.loaded_setups);
                    if let Some(busy) = h.busy_slots.filter(|_| conn.role == Role::Prover) {
                        let busy = busy.min(conn.capacity);
                        freed = busy < conn.reported_busy;
                        conn.reported_busy = busy;
                    }
                }
                let leases = parse_leases(&h.lease_ids);
                let unrenewed_for = std::time::Duration::from_secs_f64(shared.settings.lease_secs);
                freed |= shared.registry().heard_leases(id, &leases, unrenewed_for);
                if freed {
                    shared.wake_for_capacity();
                }
                shared.heard_from(id);
                // A missed renewal is made good by the next heartbeat, well before the deadline.
                if let Err(e) = renew(shared, id, identity, &leases, false).await {
                    tracing::error!(worker = %id, "renewing leases: {e}");
                }
            }
            Some(worker_message::Msg::Drain(_)) => {
                if let Some(conn) = shared.registry().get_mut(id) {
                    conn.draining = true;
                    conn.credits = 0;
                }
                tracing::info!(worker = %id, "draining: no more leases or witness vectors");
            }
            Some(worker_message::Msg::Completed(c)) => {
                reported(shared, id, &c.lease_id);
                let lease = c.lease_id.clone();
                match completed(shared, id, identity, c, outbox).await {
                    Ok(()) => {}
                    Err(e) if e.is_deterministic() => poisoned(shared, id, &lease, "its completion", &e, outbox).await,
                    Err(e) => return format!("recording a completion: {e} (the worker sends it again)"),
                }
            }
            Some(worker_message::Msg::Failed(mut f)) => {
                reported(shared, id, &f.lease_id);
                f.error = db::storable_text(&f.error).into_owned();
                let lease = f.lease_id.clone();
                match failed(shared, id, identity, f, outbox).await {
                    Ok(()) => {}
                    Err(e) if e.is_deterministic() => poisoned(shared, id, &lease, "its failure", &e, outbox).await,
                    Err(e) => return format!("recording a failure: {e} (the worker sends it again)"),
                }
            }
            Some(worker_message::Msg::Register(_)) | None => {
                refuse(outbox, "", "unexpected message (Register is only the first message)").await;
            }
        }
    }
}

/// A report of `lease` from connection `id`, as it arrives (before it is recorded): whoever
/// held the lease holds it no more (the reporter stopped working on it, and a credit it sends
/// next may buy a lease at once: [`crate::registry::Conn::held`]); and a prover's report ends a
/// proving, so one of the slots it last said were busy is free (before its next heartbeat says so).
fn reported(shared: &Shared, id: &str, lease: &str) {
    let mut reg = shared.registry();
    if let Some(lease) = parse_lease(lease) {
        reg.release_lease(lease);
    }
    if let Some(conn) = reg.get_mut(id).filter(|c| c.role == Role::Prover) {
        conn.reported_busy = conn.reported_busy.saturating_sub(1);
    }
}

/// A report that PostgreSQL refuses on its data (issue 16 rule 8: [`DbError::is_deterministic`]):
/// sending it again cannot help, so it is answered `Refused` and the stream goes on. Its lease
/// ends as a retryable failure naming why, so the job runs again (and, if every attempt's report
/// is refused, fails with that reason) instead of waiting for the lease to expire.
async fn poisoned(shared: &Shared, worker: &str, lease_id: &str, what: &str, e: &DbError, outbox: &Outbox) {
    let reason = format!("the scheduler cannot record {what}: {e}");
    tracing::error!(worker, lease = lease_id, "{reason}: refused");
    refuse(outbox, lease_id, &reason).await;
    let Some(lease) = parse_lease(lease_id) else { return };
    match db::end_lease(&shared.pool, lease, &db::storable_text(&reason), true, EndReason::Failed).await {
        Ok(Some(ended)) => {
            shared.apply(LeaseEnd { outcome: LeaseOutcome::Failed, lease: Some(lease), job: &ended.job, batch: ended.batch_number, taken_from: None });
        }
        Ok(None) | Err(DbError::StaleLease(_)) => {}
        Err(e) => tracing::error!(worker, lease = lease_id, "ending the lease of a refused report: {e} (it expires)"),
    }
}

async fn refuse(outbox: &Outbox, lease: &str, reason: &str) {
    let msg = v1::Refused { lease_id: lease.into(), reason: reason.into() };
    let _ = outbox.send(Ok(v1::SchedulerMessage { msg: Some(scheduler_message::Msg::Refused(msg)) })).await;
}

async fn recorded(outbox: &Outbox, lease: &str) {
    let msg = v1::Recorded { lease_id: lease.into() };
    let _ = outbox.send(Ok(v1::SchedulerMessage { msg: Some(scheduler_message::Msg::Recorded(msg)) })).await;
}

/// A witness generator (or the compressor) found input proofs of its job that do not verify,
/// or that are missing from the artifact store: their jobs are proven again (the provers of bad
/// ones struck, and quarantined past the threshold), and the job waits for them
/// ([`db::reject_inputs`]). A lost input that cannot be made again alone is an ordinary
/// retryable failure. `Ok(false)`: none of this applies, the caller records a plain failure.
async fn rejected_inputs(shared: &Shared, worker: &str, lease: Uuid, f: &v1::Failed, outbox: &Outbox) -> Result<bool, DbError> {
    let threshold = i64::from(shared.settings.quarantine_after_strikes);
    let reason = if f.bad_inputs.is_empty() {
        format!("lost from the artifact store; its job is proven again: {}", f.error)
    } else {
        format!("rejected by the next round: {}", f.error)
    };
    match db::reject_inputs(&shared.pool, lease, &f.bad_inputs, &f.lost_inputs, &reason, threshold).await {
        Ok(Some(r)) => {
            for input in &r.requeued {
                let by = input.by.as_deref().unwrap_or("");
                tracing::warn!(worker, job = input.job_id, lease = ?input.lease, by, "an input proof that does not verify or was lost: its job is proven again");
                shared.apply(LeaseEnd { outcome: LeaseOutcome::Rejected, lease: input.lease, job: &input.job, batch: r.batch_number, taken_from: None });
            }
            for name in &r.quarantined {
                tracing::error!(worker = name, strikes = threshold, "quarantined: it handed in proofs that do not verify (Admin.ReleaseWorker lifts it)");
                shared.registry().quarantine(name, true);
            }
            shared.apply(LeaseEnd { outcome: LeaseOutcome::Failed, lease: Some(lease), job: &r.job, batch: r.batch_number, taken_from: None });
            recorded(outbox, &f.lease_id).await;
            Ok(true)
        }
        Ok(None) => {
            refuse(outbox, &f.lease_id, "stale lease").await;
            Ok(true)
        }
        Err(DbError::Invalid(why)) if f.bad_inputs.is_empty() => {
            tracing::warn!(worker, %lease, "lost inputs that cannot be made again alone ({why}): an ordinary failure");
            Ok(false)
        }
        Err(DbError::Invalid(why)) => {
            refuse(outbox, &f.lease_id, &why).await;
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

fn parse_lease(s: &str) -> Option<Uuid> {
    Uuid::parse_str(s).ok()
}

/// Whether `identity` (the reporting connection's, TLS on) may report `lease`: it was granted
/// to that identity, or matched with it as the prover. Refuses the report on `outbox` if not.
async fn may_report(shared: &Shared, worker: &str, identity: Option<&str>, lease: Uuid, outbox: &Outbox) -> Result<bool, DbError> {
    let Some(identity) = identity else { return Ok(true) };
    if db::foreign_leases(&shared.pool, &[lease], identity).await?.is_empty() {
        return Ok(true);
    }
    tracing::warn!(worker, %lease, identity, "report for a lease bound to another identity refused");
    refuse(outbox, &lease.to_string(), "this lease is bound to another worker's certificate identity").await;
    Ok(false)
}

async fn completed(shared: &Shared, worker: &str, identity: Option<&str>, c: v1::Completed, outbox: &Outbox) -> Result<(), DbError> {
    let Some(lease) = parse_lease(&c.lease_id) else {
        refuse(outbox, &c.lease_id, "not a lease id").await;
        return Ok(());
    };
    if !may_report(shared, worker, identity, lease, outbox).await? {
        return Ok(());
    }
    let counts: Vec<(CircuitId, u32)> = c
        .circuits
        .iter()
        .filter_map(|cc| u8::try_from(cc.circuit_id).ok().map(|id| (CircuitId(id), cc.count)))
        .collect();
    match shared.completions.complete(db::Report {
        lease,
        counts,
        compute_secs: c.compute_secs,
        verified_against_batch: c.verified_against_batch,
        by: Some(worker.to_string()),
        identity: identity.map(str::to_string),
    }).await {
        Ok(done) if done.already_recorded => {
            recorded(outbox, &c.lease_id).await;
            Ok(())
        }
        Ok(done) => {
            tracing::debug!(worker, %lease, queued = done.queued, "completed");
            if done.batch_proven {
                tracing::info!(batch = done.batch_number, "batch proven");
            }
            let batch = done.batch_number;
            shared.apply(LeaseEnd { outcome: LeaseOutcome::Succeeded, lease: Some(lease), job: &done.job, batch, taken_from: None });
            if let Some((other, holder)) = &done.superseded {
                tracing::warn!(worker, %lease, superseded = %other, "late result accepted: the job's newer lease is revoked");
                let reason = "another lease of this job succeeded first";
                let taken_from = Some((holder.as_deref(), reason));
                shared.apply(LeaseEnd { outcome: LeaseOutcome::Superseded, lease: Some(*other), job: &done.job, batch, taken_from });
            }
            recorded(outbox, &c.lease_id).await;
            Ok(())
        }
        Err(DbError::StaleLease(_)) => {
            tracing::warn!(worker, %lease, "stale completion refused");
            if shared.registry().free_slot(lease) {
                shared.wake_for_capacity();
            }
            refuse(outbox, &c.lease_id, "stale lease: the job was leased again or already completed").await;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Whether connection `worker` may fail proving lease `lease` (issue 16 rule 6): it holds the
/// job (`jobs.leased_to`: the WVG, or the prover once it took the lease over), or is the prover
/// the lease was matched with (its slot, in the registry), or the holder is no live connection
/// here (a report resent on a new stream after a reconnect or a scheduler restart: `make chaos`
/// caught that case). A WVG whose receipt was lost after the hand-off must not fail the job its
/// prover, connected, is proving. Leases of other kinds, and leases no longer current, pass
/// (the usual checks answer them).
async fn from_proving_holder(shared: &Shared, worker: &str, lease: Uuid) -> Result<bool, DbError> {
    let Some(holder) = db::proving_holder(&shared.pool, lease).await? else { return Ok(true) };
    let reg = shared.registry();
    Ok(holder == worker || reg.slot_holder(lease) == Some(worker) || reg.get(&holder).is_none())
}

async fn failed(shared: &Shared, worker: &str, identity: Option<&str>, f: v1::Failed, outbox: &Outbox) -> Result<(), DbError> {
    let Some(lease) = parse_lease(&f.lease_id) else {
        refuse(outbox, &f.lease_id, "not a lease id").await;
        return Ok(());
    };
    if !may_report(shared, worker, identity, lease, outbox).await? {
        return Ok(());
    }
    if !from_proving_holder(shared, worker, lease).await? {
        tracing::warn!(worker, %lease, "failure of a proving lease from a connection that does not hold it refused: {}", f.error);
        refuse(outbox, &f.lease_id, "this proving lease is held by another connection (its prover took it over): only the holder or the matched prover may fail it").await;
        return Ok(());
    }
    if (!f.bad_inputs.is_empty() || !f.lost_inputs.is_empty()) && rejected_inputs(shared, worker, lease, &f, outbox).await? {
        return Ok(());
    }
    let reason = if f.handed_back { EndReason::HandedBack } else { EndReason::Failed };
    match db::end_lease(&shared.pool, lease, &f.error, f.retryable, reason).await {
        Ok(Some(ended)) => {
            if f.handed_back {
                tracing::info!(worker, %lease, "lease handed back unfinished (drain): queued again, no attempt spent");
            } else {
                tracing::warn!(worker, %lease, retryable = f.retryable, job_failed = ended.job_failed, "job failed: {}", f.error);
            }
            let outcome = if f.handed_back { LeaseOutcome::HandedBack } else { LeaseOutcome::Failed };
            shared.apply(LeaseEnd { outcome, lease: Some(lease), job: &ended.job, batch: ended.batch_number, taken_from: None });
            recorded(outbox, &f.lease_id).await;
            Ok(())
        }
        Ok(None) => {
            recorded(outbox, &f.lease_id).await;
            Ok(())
        }
        Err(DbError::StaleLease(_)) => {
            tracing::warn!(worker, %lease, "stale failure refused");
            refuse(outbox, &f.lease_id, "stale lease").await;
            Ok(())
        }
        Err(e) => Err(e),
    }
}
