//! What every part of the scheduler shares: the database pool, the settings, the connected
//! workers, and the two wake-up signals (work may be leasable; a batch changed).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use proofmesh_core::{ArtifactStore, Geometry};
use proofmesh_proto::v1;
use sqlx::PgPool;
use tokio::sync::{broadcast, Notify};

use crate::graph::JobKind;
use crate::groups::ProverGroups;
use crate::registry::{Registry, ZonePolicy};
use crate::weights::JobWeights;

/// Attempts a job of each kind gets before it (and its batch) fails. An attempt is a lease that
/// reached a worker and ended without success: a reported retryable failure or an expired deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxAttempts {
    /// Witness generation (all rounds).
    pub witness_generation: i32,
    /// Proving (WVG and prover together).
    pub proving: i32,
    /// Compression.
    pub compression: i32,
}

impl MaxAttempts {
    /// `n` for every kind.
    pub fn uniform(n: i32) -> Self {
        MaxAttempts { witness_generation: n, proving: n, compression: n }
    }

    /// The limit for `kind`.
    pub fn of(&self, kind: JobKind) -> i32 {
        match kind {
            JobKind::WitnessGeneration => self.witness_generation,
            JobKind::Proving => self.proving,
            JobKind::Compression => self.compression,
        }
    }
}

/// The longest a lease may live, by job kind, seconds, however often it is renewed (issue 16
/// rule 1): heartbeats prove that a worker's process is alive, not that its executor is making
/// progress, so a hung stage (a deadlock, a panic that left its task waiting) loses its job
/// after this, with the attempt spent, instead of holding it for ever.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaxLeaseAge {
    /// Witness generation (all rounds).
    pub witness_generation: f64,
    /// Proving (WVG and prover together: the prover's take-over keeps the lease's start).
    pub proving: f64,
    /// Compression.
    pub compression: f64,
}

impl MaxLeaseAge {
    /// `secs` for every kind.
    pub fn uniform(secs: f64) -> Self {
        MaxLeaseAge { witness_generation: secs, proving: secs, compression: secs }
    }

    /// The limit for `kind`, seconds.
    pub fn of(&self, kind: JobKind) -> f64 {
        match kind {
            JobKind::WitnessGeneration => self.witness_generation,
            JobKind::Proving => self.proving,
            JobKind::Compression => self.compression,
        }
    }
}

impl Default for MaxLeaseAge {
    /// 20 minutes: a basic circuit's witness generation takes tens of seconds and its proof
    /// seconds (zkSync Era's figures; our CPU prover at the default geometry, minutes); far
    /// longer is a hung executor.
    fn default() -> Self {
        MaxLeaseAge::uniform(1200.0)
    }
}

/// The scheduler's settings (from its command line).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The geometry new batches are proven with.
    pub geometry: Geometry,
    /// A lease's lifetime without a heartbeat, seconds: how long a hung (connected but silent)
    /// worker holds a job before it is leased again.
    pub lease_secs: f64,
    /// How long the leases of a worker whose stream ended wait for it to reconnect and re-attach
    /// them, seconds (at most `lease_secs`): how long a crashed worker holds a job.
    pub reconnect_grace_secs: f64,
    /// Attempts per job, by kind.
    pub max_attempts: MaxAttempts,
    /// The longest a lease lives, heartbeats or not, by kind (at least `lease_secs`).
    pub max_lease_age: MaxLeaseAge,
    /// The largest capacity a worker may register (`--max-worker-capacity`): a worker's
    /// credits never exceed its capacity, so this bounds what one connection can hold.
    pub max_worker_capacity: u32,
    /// Whether a WVG may stream to a prover of another zone.
    pub zone_policy: ZonePolicy,
    /// How often workers must heartbeat, milliseconds.
    pub heartbeat_ms: u32,
    /// The `--prover-groups` file; `None`: no groups (a worker that names one is refused).
    pub prover_groups: Option<ProverGroups>,
    /// The order rules' settings.
    pub policy: Policy,
    /// The house keeper's; `None`: artifacts are kept for ever.
    pub housekeeping: Option<Housekeeping>,
    /// Limits of the gRPC server (message size, concurrency, deadlines, keepalive).
    pub grpc: proofmesh_proto::GrpcLimits,
    /// The longest one pass over PostgreSQL may take (the dispatcher's, the lease expiry's, a
    /// completion batch's, a renewal tick's, its connection's wait included): past it the pass
    /// is given up, its connection closed (it may be half-open) and the pass tried again on a new
    /// one ([`crate::DB_PASS_DEADLINE`] in the daemon; issue 16 rule 7).
    pub db_pass_deadline: std::time::Duration,
    /// TLS (`--tls-*`): off by default.
    pub tls: proofmesh_proto::TlsArgs,
    /// Strikes (proofs handed in that did not verify) after which a worker name is quarantined
    /// (`--quarantine-after-strikes`).
    pub quarantine_after_strikes: u32,
    /// Who may call `Admin` (`--admin-subject`, `--operator-subject`; checked with TLS on).
    pub access: crate::access::AccessPolicy,
}

/// When the house keeper deletes the artifacts of finished batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Housekeeping {
    /// Seconds after a batch is proven or failed (`--artifact-retention-secs`, 7 days).
    pub retention_secs: f64,
    /// Seconds between passes (`--housekeeping-interval-secs`, 60).
    pub interval_secs: f64,
}

/// Settings of the order rules (docs/scheduling.md).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Every `ageing_secs` a batch has waited since it was submitted adds 1 to its priority, so
    /// no batch waits forever behind higher-priority ones (`--priority-ageing-secs`, 300).
    pub ageing_secs: f64,
    /// A job that has waited this long (seconds) and does not fit a worker's free memory budget
    /// stops lighter jobs from being leased to that worker until it fits
    /// (`--reserve-after-secs`, 120).
    pub reserve_after_secs: f64,
    /// Prefer, among equally urgent jobs, one whose setup data is loaded where it will be proven
    /// (`--no-setup-affinity` turns it off, for comparisons).
    pub setup_affinity: bool,
    /// Peak memory per `(aggregation_round, circuit_id)` (`--job-weights`); empty: every job
    /// weighs 0 and budgets never bind.
    pub job_weights: JobWeights,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { ageing_secs: 300.0, reserve_after_secs: 120.0, setup_affinity: true, job_weights: JobWeights::default() }
    }
}

/// Shared by the gRPC services and the dispatcher.
#[derive(Debug)]
pub struct Shared {
    /// The job state.
    pub pool: PgPool,
    /// Settings.
    pub settings: Settings,
    /// Connected workers.
    pub registry: Mutex<Registry>,
    /// Woken whenever work may have become leasable: a job queued, a credit granted, a prover
    /// slot freed, a worker connected. The dispatcher never polls.
    pub wake: Notify,
    /// Set with every wake-up that may have queued a job ([`Shared::wake_dispatcher`]): the
    /// dispatcher then reads the queued classes again before its next pass; a wake-up for
    /// capacity alone ([`Shared::wake_for_capacity`]) reuses the classes it knows.
    pub queue_changed: AtomicBool,
    /// What the dispatcher did (read by tests and `proofmesh-bench`).
    pub dispatch_stats: DispatchStats,
    /// Completed reports on their way to the batcher ([`crate::completions`]).
    pub completions: crate::completions::Completions,
    /// Lease renewals from heartbeats, written by [`crate::liveness`] at its next tick.
    pub renewals: Mutex<Vec<crate::db::Renewal>>,
    /// Connections heard from (heartbeats) since [`crate::liveness`] last recorded them.
    pub heard: Mutex<std::collections::HashSet<String>>,
    /// Batch numbers whose state or progress changed (for `WatchBatch`).
    pub batch_events: broadcast::Sender<i64>,
    /// Where final proofs are read for `GetProof`.
    pub artifacts: Arc<dyn ArtifactStore>,
    /// Woken when a lease deadline may have moved earlier than the expiry timer's wake-up (a
    /// lease granted, a worker gone), for the expiry timer.
    pub deadlines: Notify,
    /// When the expiry timer wakes next, Unix ms ([`Shared::expiry_sleeps_for`]); 0 while it
    /// is reading the deadlines (every change wakes it then). A lease granted with a later
    /// deadline is found at that wake-up, so it costs the timer no pass of its own.
    expiry_wakes_at_ms: AtomicU64,
    /// Leases may have gone without renewal through no fault of their workers: set at start-up
    /// (the scheduler was down) and whenever a renewal or the expiry timer could not reach
    /// PostgreSQL; the expiry timer gives every lease the reconnect grace before it expires
    /// any, then clears it ([`crate::expiry`]).
    pub outage: AtomicBool,
}

impl Shared {
    /// New shared state.
    pub fn new(pool: PgPool, settings: Settings, artifacts: Arc<dyn ArtifactStore>) -> Arc<Self> {
        Arc::new(Shared {
            pool,
            settings,
            registry: Mutex::default(),
            wake: Notify::new(),
            queue_changed: AtomicBool::new(true),
            heard: Mutex::default(),
            renewals: Mutex::default(),
            completions: Default::default(),
            dispatch_stats: DispatchStats::default(),
            batch_events: broadcast::channel(1024).0,
            artifacts,
            deadlines: Notify::new(),
            expiry_wakes_at_ms: AtomicU64::new(0),
            outage: AtomicBool::new(true),
        })
    }

    /// Leases were granted (their deadlines a lease timeout from now): wakes the expiry timer
    /// only if it would sleep past that. Both sides are this process's clock, so a skew of
    /// PostgreSQL's clock does not matter (only elapsed time is compared).
    pub fn leases_granted(&self) {
        let deadline = unix_ms() + (self.settings.lease_secs * 1000.0) as u64;
        let wakes_at = self.expiry_wakes_at_ms.load(Ordering::SeqCst);
        if wakes_at == 0 || deadline < wakes_at {
            self.deadlines.notify_one();
        }
    }

    /// The expiry timer: it sleeps for `sleep` from now (`None`: it is awake, reading the
    /// deadlines, and every change must wake it).
    pub fn expiry_sleeps_for(&self, sleep: Option<std::time::Duration>) {
        let wakes_at = sleep.map_or(0, |d| (unix_ms() + d.as_millis() as u64).max(1));
        self.expiry_wakes_at_ms.store(wakes_at, Ordering::SeqCst);
    }

    /// The registry (a poisoned lock means a panic while holding it: a bug; we go on with it).
    pub fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the dispatcher to look for leasable work: the job state changed (a job may have
    /// been queued), so it reads the queued classes again. When in doubt, this one.
    pub fn wake_dispatcher(&self) {
        self.queue_changed.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Tells the dispatcher that workers can take more (a credit, a registration, a freed
    /// prover slot) while the queue did not change: it matches them against the classes it knows.
    pub fn wake_for_capacity(&self) {
        self.wake.notify_one();
    }

    /// Notes a heartbeat of connection `id` (recorded in `workers.last_seen` by [`crate::liveness`]).
    pub fn heard_from(&self, id: &str) {
        let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        if !heard.contains(id) {
            heard.insert(id.to_string());
        }
    }

    /// Queues a heartbeat's renewal of `leases` for connection `id` ([`crate::liveness`]).
    pub fn queue_renewals(&self, id: &str, leases: &[uuid::Uuid], take_over: bool) {
        let mut queued = self.renewals.lock().unwrap_or_else(|e| e.into_inner());
        queued.extend(leases.iter().map(|&lease| crate::db::Renewal { lease, worker: id.to_string(), take_over }));
    }

    /// Whether a job may have been queued since the last call (clears the flag).
    pub fn take_queue_changed(&self) -> bool {
        self.queue_changed.swap(false, Ordering::SeqCst)
    }

    /// Applies a lease's end outside the database, the same way for every caller (reports,
    /// expiry, operators, late results, rejected proofs): counts it in `proofmesh_jobs_total`
    /// with its outcome; no connection holds it any more ([`crate::registry::Conn::held`]);
    /// frees its prover slot, or, when it was taken away from a holder that
    /// did not report ([`LeaseEnd::taken_from`]), revokes it there ([`Shared::take_away`]);
    /// tells `WatchBatch` streams; wakes the dispatcher (the job may be queued again, a slot
    /// or a credit is free).
    pub fn apply(&self, end: LeaseEnd<'_>) {
        crate::telemetry::lease_ended(end.job, end.outcome.as_str());
        if let Some(lease) = end.lease {
            self.registry().release_lease(lease);
            match end.taken_from {
                Some((holder, reason)) => self.take_away(lease, holder, reason),
                None => {
                    self.registry().free_slot(lease);
                }
            }
        }
        self.batch_changed(end.batch);
        self.wake_dispatcher();
    }

    /// A lease ended without its holder reporting (expired, superseded by a late result,
    /// requeued or cancelled by an operator): its prover slot is freed unless the holder is that
    /// prover ([`crate::registry::Registry::lease_taken_away`]), and the holder gets `Revoke`.
    pub fn take_away(&self, lease: uuid::Uuid, holder: Option<&str>, reason: &str) {
        self.registry().lease_taken_away(lease, holder);
        if let Some(holder) = holder {
            self.revoke(holder, lease, reason);
        }
    }

    /// Sends `Revoke` for `lease` to the worker connection `holder`, if it is connected.
    pub fn revoke(&self, holder: &str, lease: uuid::Uuid, reason: &str) {
        if let Some(conn) = self.registry().get(holder) {
            let revoke = v1::Revoke { lease_id: lease.to_string(), reason: reason.into() };
            let msg = v1::SchedulerMessage { msg: Some(v1::scheduler_message::Msg::Revoke(revoke)) };
            let _ = conn.outbox.try_send(Ok(msg));
        }
    }

    /// Tells `WatchBatch` streams that `batch` changed.
    pub fn batch_changed(&self, batch: i64) {
        let _ = self.batch_events.send(batch);
    }
}

/// A lease that ended, as [`Shared::apply`] takes it.
#[derive(Debug, Clone, Copy)]
pub struct LeaseEnd<'a> {
    /// How it ended (the metric's `outcome` label; the same as `leases.outcome`).
    pub outcome: crate::job_state::LeaseOutcome,
    /// The lease (`None`: a job that had none recorded).
    pub lease: Option<uuid::Uuid>,
    /// Its job's labels.
    pub job: &'a crate::db::JobLabels,
    /// Its job's batch.
    pub batch: i64,
    /// `Some((holder connection, reason))` when it was taken away from a holder that did not
    /// report it (expired, superseded, requeued, cancelled): the holder gets `Revoke`.
    pub taken_from: Option<(Option<&'a str>, &'a str)>,
}

/// Counts of the dispatcher's database work since the scheduler started.
#[derive(Debug, Default)]
pub struct DispatchStats {
    /// Lease statements run (one per worker that had an eligible class).
    pub lease_statements: std::sync::atomic::AtomicU64,
    /// Of those, the ones that granted a lease.
    pub leases: std::sync::atomic::AtomicU64,
    /// Reads of the queued classes.
    pub class_reads: std::sync::atomic::AtomicU64,
}

/// Now, as Unix milliseconds.
fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
