//! The dispatcher: one task that hands queued jobs to workers with credits, over their `Work`
//! streams, as soon as both exist. It sleeps on [`Shared::wake`] and never polls the database:
//! everything that can make a lease possible (a job queued, a credit, a freed prover slot, a new
//! worker) wakes it.
//!
//! Each wake-up runs set-based passes (ARCHITECTURE.md, "Dispatch"):
//! 1. the classes of queued work (`db::queued_classes`: kind, round, circuit id, protocol
//!    version), read again only when the job state changed ([`Shared::take_queue_changed`]);
//! 2. every ready worker matched in memory against them (kind, versions, prover group; a WVG
//!    also needs a free compatible prover, and tries each in order until one is granted): a
//!    worker with nothing eligible costs no SQL;
//! 3. for up to [`MAX_LEASES_PER_COMMIT`] matched workers, one transaction: one statement reads
//!    each eligible class's most urgent queued jobs (as many as workers may take it), each
//!    worker takes its best one in memory, one statement grants them all, and one durable
//!    commit ends it (a worker a memory budget binds runs its own lease statement in it);
//! 4. after the commit, the leases are sent. A class that had fewer queued jobs than were
//!    asked for is known empty once they are taken, so the workers after it that want only
//!    those classes cost nothing either.
//!
//! Passes repeat (one lease per worker per pass, so workers share the queue fairly) until one
//! grants nothing.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use proofmesh_proto::v1::{self, scheduler_message, Role};
use tokio_util::sync::CancellationToken;

use crate::db::{self, LeasedJob, QueuedClass};
use crate::graph::JobKind;
use crate::registry::{Conn, Registry};
use crate::state::Shared;

/// Leases granted in one transaction at most: a pass over a large ready fleet commits (and
/// sends) in chunks of this many, so the first leases do not wait for the last statement.
pub const MAX_LEASES_PER_COMMIT: usize = 64;

/// Runs until `cancel`.
pub async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut classes: Vec<QueuedClass> = vec![];
    loop {
        let result = bounded_passes(&shared, &mut classes).await;
        if let Err(e) = result {
            tracing::error!("dispatch: {e}");
            // A database error: try again on the next wake-up (or shortly, so nothing stalls),
            // reading the queued classes again (a rolled-back pass may have taken some out).
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            shared.wake_dispatcher();
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// [`dispatch_all`] on one connection, within the pass deadline (`Settings::db_pass_deadline`):
/// a connection that stops answering (a partition) costs one deadline, is closed, and the next
/// wake-up starts on a new one (issue 16 rule 7).
async fn bounded_passes(shared: &Shared, classes: &mut Vec<QueuedClass>) -> Result<(), db::DbError> {
    let deadline = shared.settings.db_pass_deadline;
    let mut conn = db::pass_connection(&shared.pool, deadline).await?;
    match tokio::time::timeout(deadline, dispatch_all(shared, &mut conn, classes)).await {
        Ok(result) => result,
        Err(_) => Err(db::abandon(conn, deadline)),
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

/// Passes until one grants nothing. `classes` are the queued classes known from an earlier
/// wake-up; they are read again first if the job state changed since.
async fn dispatch_all(shared: &Shared, conn: &mut sqlx::PgConnection, classes: &mut Vec<QueuedClass>) -> Result<(), db::DbError> {
    loop {
        if shared.take_queue_changed() {
            *classes = db::queued_classes(conn).await?;
            shared.dispatch_stats.class_reads.fetch_add(1, Ordering::Relaxed);
        }
        if classes.is_empty() || pass(shared, conn, classes).await? == 0 {
            return Ok(());
        }
    }
}

/// What the dispatcher knows of a worker (and, for a WVG, its matched prover) when it asks for a
/// lease: read under the registry's lock, used after it.
#[derive(Clone)]
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

impl Ask {
    /// Whether no memory budget binds it (neither the worker's nor its matched prover's): then
    /// nothing but the lease order decides, and the chunk's candidates serve it.
    fn unbudgeted(&self) -> bool {
        self.budget_mib == 0 && self.prover.as_ref().is_none_or(|p| p.budget_mib == 0)
    }
}

/// The prover matched with a WVG lease.
#[derive(Clone)]
struct MatchedProver {
    id: String,
    identity: Option<String>,
    endpoint: String,
    budget_mib: i64,
    slot_leases: Vec<uuid::Uuid>,
}

/// Decides, under the registry's lock, what to ask the database for on `worker`'s behalf, each
/// ask with its classes among `classes`; empty when it can take nothing now (not a leasing role,
/// no eligible class, or a WVG without a free prover that can take one). A WVG gets one ask per
/// prover it may be matched with ([`crate::registry::Registry::provers_for`], best first), each
/// limited to what both take, without the provers for which nothing is queued: the pass tries
/// them in order until one is granted, so no job waits while a prover that can take it is free.
fn asks_for(shared: &Shared, worker: &str, classes: &[QueuedClass]) -> Vec<(Ask, Vec<QueuedClass>)> {
    let reg = shared.registry();
    let Some(conn) = reg.get(worker).filter(|c| !c.quarantined) else { return vec![] };
    let Some(kind) = kind_of(conn.role) else { return vec![] };
    let budget = |mib: u64| i64::try_from(mib).unwrap_or(i64::MAX);
    let affinity = shared.settings.policy.setup_affinity;
    let own = Ask {
        kind,
        versions: conn.versions.clone(),
        pairs: conn.pairs.clone(),
        warm: if affinity { conn.loaded_setups.clone() } else { vec![] },
        warm_own: vec![],
        budget_mib: budget(conn.memory_budget_mib),
        prover: None,
        identity: conn.identity.clone(),
    };
    if conn.role != Role::Wvg {
        let eligible = db::eligible(classes, kind, &own.versions, &own.pairs);
        return if eligible.is_empty() { vec![] } else { vec![(own, eligible)] };
    }
    let mut asks = vec![];
    // provers_for only lists provers that share a version and a pair with the WVG.
    for id in reg.provers_for(conn, shared.settings.zone_policy) {
        let p = reg.get(&id).expect("listed from the registry");
        let mut ask = own.clone();
        // A WVG lease must suit both the WVG and its prover ...
        if !p.versions.is_empty() {
            ask.versions = if conn.versions.is_empty() {
                p.versions.clone()
            } else {
                conn.versions.iter().copied().filter(|v| p.versions.contains(v)).collect()
            };
        }
        let Some(pairs) = crate::groups::intersect(&conn.pairs, &p.pairs) else { continue };
        ask.pairs = pairs;
        let eligible = db::eligible(classes, kind, &ask.versions, &ask.pairs);
        if eligible.is_empty() {
            continue;
        }
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
        asks.push((ask, eligible));
    }
    asks
}

/// A lease granted in the pass's transaction, not yet committed or sent.
struct Grant {
    worker: String,
    job: LeasedJob,
    inputs: Vec<(String, i16)>,
    prover: Option<MatchedProver>,
    identity: Option<String>,
}

/// One pass: every ready worker with an eligible class gets at most one lease. Returns how many
/// were granted (and sent or put back).
async fn pass(shared: &Shared, conn: &mut sqlx::PgConnection, classes: &mut Vec<QueuedClass>) -> Result<usize, db::DbError> {
    let ready = shared.registry().ready();
    let mut granted = 0;
    let mut workers = ready.iter();
    loop {
        let mut grants = vec![];
        let chunk = grant_chunk(shared, conn, classes, &mut workers, &mut grants).await;
        // A failed statement or commit: the leases of the chunk do not exist; give back what
        // was held for them in memory.
        if let Err(e) = chunk {
            give_back(shared, grants.iter().map(|g| (g.worker.as_str(), g.job.lease_id)));
            return Err(e);
        }
        if grants.is_empty() {
            return Ok(granted);
        }
        granted += grants.len();
        // Every committed lease is sent (or put back), even if putting one back fails.
        let mut failed = None;
        for grant in grants {
            if let Err(e) = send(shared, conn, grant).await {
                failed.get_or_insert(e);
            }
        }
        shared.leases_granted();
        if let Some(e) = failed {
            return Err(e);
        }
    }
}

/// Grants leases to the next workers of `workers` in one transaction, until
/// [`MAX_LEASES_PER_COMMIT`] workers with something to ask for or the end of the list; commits.
/// Workers no memory budget binds (the common case) cost the chunk two statements together:
/// [`db::candidates`] reads, per eligible class, as many of its most urgent queued jobs as there
/// are workers asking for it; each worker, in order, takes the first of its classes' heads in
/// the lease order (setup-data affinity its own); [`db::lease_many`] grants them all. A worker
/// a budget binds runs its own lease statement ([`db::lease_in`]: the budget and reserve rules
/// need the jobs it already holds). Each grant holds its prover slot and a credit in the
/// registry at once, so the next worker's match sees them; if the chunk fails, they are given
/// back before the error is returned.
async fn grant_chunk(
    shared: &Shared,
    conn: &mut sqlx::PgConnection,
    classes: &mut Vec<QueuedClass>,
    workers: &mut std::slice::Iter<'_, String>,
    grants: &mut Vec<Grant>,
) -> Result<(), db::DbError> {
    let mut chunk: Vec<(String, Vec<(Ask, Vec<QueuedClass>)>)> = vec![];
    for worker in workers.by_ref() {
        let asks = asks_for(shared, worker, classes);
        if !asks.is_empty() {
            chunk.push((worker.clone(), asks));
            if chunk.len() >= MAX_LEASES_PER_COMMIT {
                break;
            }
        }
    }
    if chunk.is_empty() {
        return Ok(());
    }
    let mut planned: Vec<Planned> = vec![];
    let result = grant_in(shared, conn, classes, chunk, &mut planned, grants).await;
    if result.is_err() {
        give_back(shared, planned.iter().map(|p| (p.worker.as_str(), p.lease_id)));
    }
    result
}

/// A lease a worker took from the candidates, held in the registry, not yet granted.
struct Planned {
    worker: String,
    candidate: db::Candidate,
    lease_id: uuid::Uuid,
    prover: Option<MatchedProver>,
    identity: Option<String>,
}

/// [`grant_chunk`]'s transaction. `planned` holds what was taken in memory and not yet
/// granted (the caller gives it back on an error).
async fn grant_in(
    shared: &Shared,
    conn: &mut sqlx::PgConnection,
    classes: &mut Vec<QueuedClass>,
    chunk: Vec<(String, Vec<(Ask, Vec<QueuedClass>)>)>,
    planned: &mut Vec<Planned>,
    grants: &mut Vec<Grant>,
) -> Result<(), db::DbError> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    let unbudgeted = |asks: &[(Ask, Vec<QueuedClass>)]| asks.iter().all(|(a, _)| a.unbudgeted());
    // How many workers of the chunk may take each class: that many of its jobs are read.
    let mut demand: std::collections::BTreeMap<QueuedClass, i64> = Default::default();
    for (_, asks) in chunk.iter().filter(|(_, a)| unbudgeted(a)) {
        let mut mine: Vec<QueuedClass> = asks.iter().flat_map(|(_, e)| e.iter().copied()).collect();
        mine.sort();
        mine.dedup();
        for c in mine {
            *demand.entry(c).or_default() += 1;
        }
    }
    let mut pool = CandidatePool::default();
    if !demand.is_empty() {
        // One more than may be taken: a class that has no more than that is known empty once
        // they are taken.
        let wants: Vec<(QueuedClass, i64)> = demand.into_iter().map(|(c, n)| (c, n + 1)).collect();
        let found = db::candidates(&mut tx, &wants).await?;
        counted(shared, !found.is_empty());
        pool = CandidatePool::new(&wants, found);
    }
    let mut generic_plans = false;
    for (worker, asks) in chunk {
        if unbudgeted(&asks) {
            if let Some(p) = pool.take(shared, &worker, asks) {
                planned.push(p);
            }
            continue;
        }
        if !generic_plans {
            // The lease statement's plan does not depend on its parameters (index ranges named
            // by them): plan it once per connection, not on every call (planning it cost as
            // much as running it).
            sqlx::query("SET LOCAL plan_cache_mode = force_generic_plan").execute(&mut *tx).await?;
            generic_plans = true;
        }
        if let Some(grant) = lease_budgeted(shared, &mut tx, &worker, asks, classes).await? {
            grants.push(grant);
        }
    }
    // Nothing is queued of a class whose every queued job was read and taken: no later worker
    // needs to ask for it.
    classes.retain(|c| !pool.exhausted(c));
    if !planned.is_empty() {
        let rows: Vec<db::GrantRow<'_>> = planned
            .iter()
            .map(|p| db::GrantRow {
                job_id: p.candidate.id,
                lease_id: p.lease_id,
                worker: &p.worker,
                identity: p.identity.as_deref(),
                prover_identity: p.prover.as_ref().and_then(|m| m.identity.as_deref()),
            })
            .collect();
        let leased = db::lease_many(&mut tx, &rows, shared.settings.lease_secs).await?;
        counted(shared, !leased.is_empty());
        let later: Vec<i64> =
            leased.iter().filter(|j| j.job.kind == JobKind::WitnessGeneration.as_str() && j.job.aggregation_round > 0).map(|j| j.id).collect();
        let mut inputs = if later.is_empty() { Default::default() } else { db::inputs_of(&mut tx, &later).await? };
        let mut leased: std::collections::HashMap<uuid::Uuid, db::LeasedJob> = leased.into_iter().map(|j| (j.lease_id, j)).collect();
        for p in std::mem::take(planned) {
            let Some(job) = leased.remove(&p.lease_id) else {
                // No longer queued (cancelled meanwhile): this grant does not exist.
                give_back(shared, [(p.worker.as_str(), p.lease_id)]);
                continue;
            };
            let inputs = match inputs.remove(&job.id) {
                Some(keys) => keys,
                None => job.input_key.clone().map(|k| vec![(k, 0)]).unwrap_or_default(),
            };
            shared.dispatch_stats.leases.fetch_add(1, Ordering::Relaxed);
            grants.push(Grant { worker: p.worker, job, inputs, prover: p.prover, identity: p.identity });
        }
    }
    tx.commit().await?;
    Ok(())
}

/// The candidates of a chunk, per class in index order, and which classes had fewer queued
/// jobs than were read for (so, once taken, they are known empty).
#[derive(Default)]
struct CandidatePool {
    queues: std::collections::HashMap<QueuedClass, std::collections::VecDeque<db::Candidate>>,
    short: std::collections::HashSet<QueuedClass>,
}

impl CandidatePool {
    fn new(wants: &[(QueuedClass, i64)], found: Vec<db::Candidate>) -> Self {
        let mut pool = CandidatePool::default();
        for c in found {
            pool.queues.entry(c.class).or_default().push_back(c);
        }
        for (class, n) in wants {
            if pool.queues.get(class).map_or(0, |q| q.len() as i64) < *n {
                pool.short.insert(*class);
            }
        }
        pool
    }

    /// Whether every queued job of `class` was read (fewer than asked for) and taken.
    fn exhausted(&self, class: &QueuedClass) -> bool {
        self.short.contains(class) && self.queues.get(class).is_none_or(|q| q.is_empty())
    }

    /// `worker`'s lease among the candidates: its asks in order (a WVG's, one per prover, best
    /// prover first, each only while that prover has a free slot), each taking the first head
    /// of its classes in the lease order. Holds the prover slot and a credit. `None`: nothing
    /// for it.
    fn take(&mut self, shared: &Shared, worker: &str, asks: Vec<(Ask, Vec<QueuedClass>)>) -> Option<Planned> {
        let mut reg = shared.registry();
        for (ask, eligible) in &asks {
            if let Some(p) = &ask.prover {
                // An earlier grant of this pass may have taken the prover's last slot.
                if !reg.get(&p.id).is_some_and(Conn::has_free_slot) {
                    continue;
                }
            }
            let best = eligible
                .iter()
                .filter_map(|c| self.queues.get(c).and_then(|q| q.front()))
                .min_by(|a, b| a.order(b, &ask.warm, &ask.warm_own))
                .copied();
            let Some(best) = best else { continue };
            self.queues.get_mut(&best.class).and_then(|q| q.pop_front());
            let lease_id = uuid::Uuid::new_v4();
            hold(&mut reg, worker, ask.prover.as_ref(), lease_id);
            return Some(Planned { worker: worker.to_string(), candidate: best, lease_id, prover: ask.prover.clone(), identity: ask.identity.clone() });
        }
        None
    }
}

/// Counts a lease statement the dispatcher ran (`hit`: it found or granted something).
fn counted(shared: &Shared, hit: bool) {
    shared.dispatch_stats.lease_statements.fetch_add(1, Ordering::Relaxed);
    let result = if hit { "hit" } else { "miss" };
    metrics::counter!(proofmesh_core::telemetry::names::LEASE_STATEMENTS, "result" => result).increment(1);
}

/// Holds, for a lease of `worker`'s, its matched prover's slot and one of its credits, and
/// counts the lease as held by it ([`Conn::held`]), so the next worker's match sees them.
fn hold(reg: &mut Registry, worker: &str, prover: Option<&MatchedProver>, lease: uuid::Uuid) {
    if let Some(p) = prover {
        reg.hold_slot(&p.id, lease);
    }
    if let Some(conn) = reg.get_mut(worker) {
        conn.credits = conn.credits.saturating_sub(1);
    }
    reg.hold_lease(worker, lease);
}

/// Gives back what [`hold`] held for leases that were not granted or not sent: `(worker,
/// lease)` pairs.
fn give_back<'a>(shared: &Shared, held: impl IntoIterator<Item = (&'a str, uuid::Uuid)>) {
    let mut reg = shared.registry();
    for (worker, lease) in held {
        reg.free_slot(lease);
        reg.release_lease(lease);
        if let Some(conn) = reg.get_mut(worker) {
            conn.credits = conn.credits.saturating_add(1);
        }
    }
}

/// A worker a memory budget binds: its asks in order, one lease statement each, until one is
/// granted (docs/scheduling.md, "memory budgets").
async fn lease_budgeted(
    shared: &Shared,
    tx: &mut sqlx::PgConnection,
    worker: &str,
    asks: Vec<(Ask, Vec<QueuedClass>)>,
    classes: &mut Vec<QueuedClass>,
) -> Result<Option<Grant>, db::DbError> {
    for (mut ask, eligible) in asks {
        // A miss for an earlier prover may have shown some of these classes empty.
        let eligible: Vec<QueuedClass> = eligible.into_iter().filter(|c| classes.contains(c)).collect();
        if eligible.is_empty() {
            continue;
        }
        if let Some(p) = &mut ask.prover {
            // An earlier grant of this pass may have taken the prover's last slot, or added
            // to the leases its budget counts.
            let reg = shared.registry();
            if !reg.get(&p.id).is_some_and(Conn::has_free_slot) {
                continue;
            }
            p.slot_leases = reg.slot_leases(&p.id);
        }
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
        let job = db::lease_in(tx, &request, &eligible).await?;
        counted(shared, job.is_some());
        let Some(job) = job else {
            // A WVG tries its next prover (a budget that binds here may not bind there).
            continue;
        };
        let inputs = match ask.kind {
            JobKind::WitnessGeneration if job.job.aggregation_round > 0 => db::inputs_of(tx, &[job.id]).await?.remove(&job.id).unwrap_or_default(),
            _ => job.input_key.clone().map(|k| vec![(k, 0)]).unwrap_or_default(),
        };
        hold(&mut shared.registry(), worker, ask.prover.as_ref(), job.lease_id);
        shared.dispatch_stats.leases.fetch_add(1, Ordering::Relaxed);
        return Ok(Some(Grant { worker: worker.to_string(), job, inputs, prover: ask.prover, identity: ask.identity }));
    }
    Ok(None)
}

/// Sends a committed lease to its worker (and, TLS on, tells the matched prover whose witness
/// vector to accept); a worker that left meanwhile gets nothing and the lease goes back to the
/// queue, its attempt not counted.
async fn send(shared: &Shared, conn: &mut sqlx::PgConnection, grant: Grant) -> Result<(), db::DbError> {
    let Grant { worker, job, inputs, prover, identity } = grant;
    let mut lease = lease_message(&job, inputs);
    let sent = {
        let reg = shared.registry();
        if let Some(p) = &prover {
            lease.prover_endpoint = p.endpoint.clone();
            lease.prover_worker_id = p.id.clone();
            if let (Some(wvg), Some(conn)) = (&identity, reg.get(&p.id)) {
                // TLS on: the prover accepts this witness vector from the WVG's identity only.
                // Sent before the lease, on the prover's own stream; if it is lost the push is
                // refused and the WVG reports a retryable failure.
                let expect = v1::ExpectWitnessVector { lease_id: job.lease_id.to_string(), wvg_identity: wvg.clone() };
                let _ = conn.outbox.try_send(Ok(v1::SchedulerMessage { msg: Some(scheduler_message::Msg::ExpectWitnessVector(expect)) }));
            }
        }
        let msg = v1::SchedulerMessage { msg: Some(scheduler_message::Msg::Lease(lease)) };
        reg.get(&worker).is_some_and(|conn| conn.outbox.try_send(Ok(msg)).is_ok())
    };
    if !sent {
        // The worker left (or its stream is full) between the grant and the send: put it back,
        // and give back the credit the grant took.
        give_back(shared, [(worker.as_str(), job.lease_id)]);
        db::unlease(conn, job.lease_id).await?;
        shared.wake_dispatcher();
        return Ok(());
    }
    tracing::debug!(worker, job = job.id, lease = %job.lease_id, "leased");
    crate::telemetry::leased(&job.job.kind, job.waited_secs);
    shared.batch_changed(job.job.batch_number);
    Ok(())
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
