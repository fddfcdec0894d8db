//! The lease client every role shares: one `Scheduler.Work` stream, kept open across scheduler
//! restarts and network cuts (reconnect with exponential backoff and jitter, register again with
//! the leases still held, grant the free credits again).
//!
//! - Credits are flow control: one per free slot, so the scheduler never pushes more leases than
//!   the worker can run.
//! - Heartbeats name every lease held and are sent by the stream's own task on the async runtime;
//!   executors run on blocking threads ([`crate::runner::execute`]), so proving cannot starve them.
//! - Reports (`Completed`, `Failed`) stay pending until the scheduler answers `Recorded` or
//!   `Refused`, and are sent again on every new stream: a report is never lost to a restart, and
//!   the scheduler records each lease's report once.
//! - Drain (SIGTERM): the client tells the scheduler to lease it nothing more.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proofmesh_core::backoff::Backoff;
use proofmesh_proto::v1::{self, scheduler_client::SchedulerClient, scheduler_message, worker_message, Role};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// How a worker introduces itself (the `Register` message), and where the scheduler is.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The scheduler's URL, e.g. `http://127.0.0.1:50051`.
    pub scheduler: String,
    /// Role.
    pub role: Role,
    /// Name for logs.
    pub name: String,
    /// Zone (e.g. `europe-west4-a`).
    pub zone: String,
    /// Region.
    pub region: String,
    /// Host.
    pub host: String,
    /// Jobs (or, for provers, witness vectors) at once.
    pub capacity: u32,
    /// Provers: the URL their `Prover` service is reachable at.
    pub prover_endpoint: String,
    /// Protocol versions accepted (empty: all).
    pub protocol_versions: Vec<v1::ProtocolVersion>,
    /// WVGs and provers: the prover group whose pairs it takes (`None`: all).
    pub prover_group: Option<u32>,
    /// Memory for the weights of the jobs it holds, MiB (0: no limit).
    pub memory_budget_mib: u64,
    /// TLS to the scheduler (the files are read at each connection, so a rotated certificate
    /// is used from the next reconnect on).
    pub tls: proofmesh_proto::TlsArgs,
}

/// This machine's host name (`/etc/hostname`), `localhost` if it has none: what workers register
/// as their host unless told otherwise.
pub fn this_host() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Reconnect delays: 100 ms doubling up to 5 s, jittered.
fn backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
}

/// A connection to the scheduler that survives its restarts.
#[derive(Debug)]
pub struct LeaseClient {
    reg: Registration,
    /// The current stream's sender; `None` while disconnected.
    out: Mutex<Option<mpsc::UnboundedSender<v1::WorkerMessage>>>,
    /// Leases received and not yet released (counts against capacity).
    in_flight: AtomicU32,
    /// Leases this worker is working on: named in every heartbeat and in `Register` after a reconnect.
    held: Mutex<BTreeSet<String>>,
    /// Reports not yet answered, by lease id.
    pending: Mutex<BTreeMap<String, v1::WorkerMessage>>,
    /// Woken when a lease is released or a report answered.
    changed: Notify,
    /// `Drain` sent (and sent again after a reconnect).
    draining: AtomicBool,
    /// Set by `Registered`.
    worker_id: Mutex<String>,
    /// The scheduler refused the registration itself (an unknown prover group, a bad setting):
    /// retrying cannot help. Cancelled with the reason in `refusal`.
    refused: CancellationToken,
    refusal: Mutex<Option<String>>,
    /// Circuits whose setup data is loaded (sent with every heartbeat and `Register`).
    loaded_setups: Mutex<Vec<v1::CircuitPair>>,
    /// Provers: how many slots are proving now (`Heartbeat.busy_slots`).
    /// (its capacity, its free slots).
    busy_slots: std::sync::OnceLock<(u32, Arc<tokio::sync::Semaphore>)>,
    /// Provers, TLS on: the WVG identity each announced witness vector may come from
    /// (`ExpectWitnessVector`), by lease id, with when it was announced.
    expected: Mutex<BTreeMap<String, (String, Instant)>>,
    /// Woken when an announcement arrives.
    announced: Notify,
    /// Picked once, sent on every registration (`Register.instance_id`): a reconnect replaces
    /// this process's half-open old stream at the scheduler.
    instance_id: String,
}

/// How long an announced push is waited for before its announcement is forgotten.
const EXPECTATION_TTL: Duration = Duration::from_secs(3600);

fn msg(m: worker_message::Msg) -> v1::WorkerMessage {
    v1::WorkerMessage { msg: Some(m) }
}

impl LeaseClient {
    /// Connects in the background (retrying until `stop`); leases arrive on the returned receiver.
    pub fn start(reg: Registration, stop: CancellationToken) -> (Arc<Self>, mpsc::Receiver<v1::Lease>) {
        let client = Arc::new(LeaseClient {
            reg,
            out: Mutex::new(None),
            in_flight: AtomicU32::new(0),
            held: Mutex::default(),
            pending: Mutex::default(),
            changed: Notify::new(),
            draining: AtomicBool::new(false),
            worker_id: Mutex::new(String::new()),
            refused: CancellationToken::new(),
            refusal: Mutex::new(None),
            loaded_setups: Mutex::default(),
            busy_slots: std::sync::OnceLock::new(),
            expected: Mutex::default(),
            announced: Notify::new(),
            instance_id: format!("{:032x}", rand::random::<u128>()),
        });
        let (leases, rx) = mpsc::channel(1024);
        tokio::spawn(client.clone().supervise(leases, stop));
        (client, rx)
    }

    /// Cancelled when the scheduler refused the registration (see [`LeaseClient::refusal`]); the
    /// client has stopped and the lease receiver is closed.
    pub fn refused(&self) -> CancellationToken {
        self.refused.clone()
    }

    /// Why the scheduler refused the registration, if it did.
    pub fn refusal(&self) -> Option<String> {
        self.refusal.lock().expect("poisoned").clone()
    }

    /// The id the scheduler gave this worker's current stream (empty before the first registration).
    pub fn worker_id(&self) -> String {
        self.worker_id.lock().expect("poisoned").clone()
    }

    fn takes_leases(&self) -> bool {
        self.reg.role != Role::Prover
    }

    fn send_now(&self, m: v1::WorkerMessage) -> bool {
        match &*self.out.lock().expect("poisoned") {
            Some(tx) => tx.send(m).is_ok(),
            None => false,
        }
    }

    /// Queues a report for `lease` and sends it if connected; it is sent again on every new
    /// stream until the scheduler answers it.
    fn report(&self, lease: &str, m: v1::WorkerMessage) {
        self.pending.lock().expect("poisoned").insert(lease.to_string(), m.clone());
        self.send_now(m);
    }

    /// Reports a completed job (its `lease_id` set).
    pub fn completed(&self, c: v1::Completed) {
        let lease = c.lease_id.clone();
        self.report(&lease, msg(worker_message::Msg::Completed(c)));
    }

    /// Reports a failed job. `handed_back`: not a failure of the job, the worker gave it up
    /// unfinished (drain); the scheduler requeues it without counting an attempt.
    pub fn failed(&self, lease_id: &str, error: &str, retryable: bool, handed_back: bool) {
        let f = v1::Failed { lease_id: lease_id.into(), error: error.into(), retryable, handed_back, bad_inputs: vec![], lost_inputs: vec![] };
        self.report(lease_id, msg(worker_message::Msg::Failed(f)));
    }

    /// Reports a failed job from its [`crate::runner::JobError`] (bad inputs included).
    pub fn failed_with(&self, lease_id: &str, e: &crate::runner::JobError) {
        let f = v1::Failed {
            lease_id: lease_id.into(),
            error: e.message.clone(),
            retryable: e.retryable,
            handed_back: e.handed_back,
            bad_inputs: e.bad_inputs.clone(),
            lost_inputs: e.lost_inputs.clone(),
        };
        self.report(lease_id, msg(worker_message::Msg::Failed(f)));
    }

    /// Starts renewing `lease` (a received lease, or a witness vector a prover accepted) and
    /// heartbeats it at once, which attaches it to this worker's stream.
    pub fn hold(&self, lease: &str) {
        self.held.lock().expect("poisoned").insert(lease.to_string());
        self.send_now(self.heartbeat(vec![lease.to_string()]));
    }

    /// Records the circuits whose setup data is loaded now; when that changed, tells the scheduler
    /// at once (a heartbeat) so its next lease can prefer them (setup-data affinity).
    pub fn set_loaded_setups(&self, pairs: Vec<v1::CircuitPair>) {
        let changed = {
            let mut loaded = self.loaded_setups.lock().expect("poisoned");
            let changed = *loaded != pairs;
            *loaded = pairs;
            changed
        };
        if changed {
            self.send_now(self.heartbeat(vec![]));
        }
    }

    /// Provers: every heartbeat from now on says how many of its `capacity` slots are proving:
    /// those not free in `free` (one permit per free slot; `Heartbeat.busy_slots`). Set once; a
    /// second call changes nothing.
    pub fn report_busy_slots(&self, capacity: u32, free: Arc<tokio::sync::Semaphore>) {
        let _ = self.busy_slots.set((capacity, free));
    }

    /// A heartbeat renewing `lease_ids`, with the setups loaded now (and a prover's busy slots).
    fn heartbeat(&self, lease_ids: Vec<String>) -> v1::WorkerMessage {
        let loaded_setups = self.loaded_setups.lock().expect("poisoned").clone();
        let busy_slots = self.busy_slots.get().map(|(capacity, free)| capacity.saturating_sub(free.available_permits() as u32));
        msg(worker_message::Msg::Heartbeat(v1::Heartbeat { lease_ids, loaded_setups, busy_slots }))
    }

    /// Stops renewing `lease` (its report is queued, or it was handed to a prover).
    pub fn unhold(&self, lease: &str) {
        self.held.lock().expect("poisoned").remove(lease);
        self.changed.notify_waiters();
    }

    /// Provers: claims the push of `lease`'s witness vector for `pusher`, waiting up to `within`
    /// for the scheduler's announcement (it may trail the push). `Ok` (the announcement is used
    /// up: one push per lease) if it names `pusher`; `Err(Some(announced))` if it names another
    /// identity (kept for the right one); `Err(None)` if none came.
    pub async fn claim_push(&self, lease: &str, pusher: &str, within: Duration) -> Result<(), Option<String>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let wait = self.announced.notified();
            {
                let mut expected = self.expected.lock().expect("poisoned");
                match expected.get(lease) {
                    Some((identity, _)) if identity == pusher => {
                        expected.remove(lease);
                        return Ok(());
                    }
                    Some((identity, _)) => return Err(Some(identity.clone())),
                    None => {}
                }
            }
            tokio::select! {
                _ = wait => {}
                _ = tokio::time::sleep_until(deadline) => return Err(None),
            }
        }
    }

    fn announce(&self, e: v1::ExpectWitnessVector) {
        let mut expected = self.expected.lock().expect("poisoned");
        // Pushes that never came (their WVG died) are forgotten after a while.
        expected.retain(|_, (_, at)| at.elapsed() < EXPECTATION_TTL);
        expected.insert(e.lease_id, (e.wvg_identity, Instant::now()));
        drop(expected);
        self.announced.notify_waiters();
    }

    /// The leases held now.
    pub fn held(&self) -> Vec<String> {
        self.held.lock().expect("poisoned").iter().cloned().collect()
    }

    /// Frees the slot `lease` took and grants the scheduler one more credit (unless draining).
    pub fn release(&self, lease: &str) {
        self.unhold(lease);
        {
            // Under the stream's lock, so a registration counts this slot free exactly once:
            // either its credit goes on the current stream, or the next registration grants it.
            let out = self.out.lock().expect("poisoned");
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if let (Some(tx), false) = (&*out, self.draining.load(Ordering::SeqCst)) {
                let _ = tx.send(msg(worker_message::Msg::Credit(v1::Credit { n: 1 })));
            }
        }
        self.changed.notify_waiters();
    }

    /// Asks the scheduler to lease nothing more to this worker (and, for a prover, to match no
    /// more WVGs with it).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.send_now(msg(worker_message::Msg::Drain(v1::Drain {})));
    }

    /// Waits until no lease is held and every report is answered, or `within` passes. Returns
    /// whether it got there.
    pub async fn settled(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let wait = self.changed.notified();
            let idle = self.held.lock().expect("poisoned").is_empty() && self.pending.lock().expect("poisoned").is_empty();
            if idle {
                return true;
            }
            tokio::select! {
                _ = wait => {}
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    async fn supervise(self: Arc<Self>, leases: mpsc::Sender<v1::Lease>, stop: CancellationToken) {
        let mut backoff = backoff();
        loop {
            let result = self.connect_once(&leases, &stop, &mut backoff).await;
            *self.out.lock().expect("poisoned") = None;
            match result {
                Ok(()) if stop.is_cancelled() => return,
                Ok(()) => tracing::warn!("scheduler stream closed; reconnecting"),
                Err(e) => {
                    if let Some(status) = e.downcast_ref::<tonic::Status>().filter(|s| s.code() == tonic::Code::InvalidArgument) {
                        let reason = format!("the scheduler refused this worker: {}", status.message());
                        tracing::error!("{reason}");
                        *self.refusal.lock().expect("poisoned") = Some(reason);
                        self.refused.cancel();
                        return;
                    }
                    tracing::warn!("scheduler at {}: {e}; retrying in about {:?}", self.reg.scheduler, backoff.delay())
                }
            }
            if !backoff.wait(&stop).await {
                return;
            }
        }
    }

    /// One stream's life: register (re-attaching held leases), grant credits, resend pending
    /// reports, heartbeat, forward leases. Resets `backoff` once registered.
    async fn connect_once(
        &self,
        leases: &mpsc::Sender<v1::Lease>,
        stop: &CancellationToken,
        backoff: &mut Backoff,
    ) -> anyhow::Result<()> {
        let channel = self
            .reg
            .tls
            .endpoint(&self.reg.scheduler)?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            // A scheduler that vanished without a reset (a partition, a lost node) is noticed
            // within about 30 s, and the worker reconnects (issue 16 rule 7).
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect()
            .await?;
        let mut client = SchedulerClient::new(channel);
        let (tx, rx) = mpsc::unbounded_channel();
        let r = &self.reg;
        tx.send(msg(worker_message::Msg::Register(v1::Register {
            role: r.role as i32,
            zone: r.zone.clone(),
            region: r.region.clone(),
            host: r.host.clone(),
            capacity: r.capacity,
            prover_endpoint: r.prover_endpoint.clone(),
            protocol_versions: r.protocol_versions.clone(),
            name: r.name.clone(),
            held_leases: self.held(),
            prover_group: r.prover_group,
            memory_budget_mib: r.memory_budget_mib,
            loaded_setups: self.loaded_setups.lock().expect("poisoned").clone(),
            instance_id: self.instance_id.clone(),
        })))?;
        let mut inbound = client.work(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await?.into_inner();
        let first = inbound.message().await?.and_then(|m| m.msg);
        let Some(scheduler_message::Msg::Registered(registered)) = first else {
            anyhow::bail!("the scheduler did not answer Register with Registered");
        };
        backoff.reset();
        *self.worker_id.lock().expect("poisoned") = registered.worker_id.clone();
        tracing::info!(worker = registered.worker_id, "registered with the scheduler");
        {
            // Credits and the stream become current together (see `release`); pending reports
            // are sent after the stream is current, so one queued meanwhile is not missed (it may
            // go twice: the scheduler answers a repeated report the same way).
            let mut out = self.out.lock().expect("poisoned");
            if self.draining.load(Ordering::SeqCst) {
                tx.send(msg(worker_message::Msg::Drain(v1::Drain {})))?;
            } else if self.takes_leases() {
                let free = self.reg.capacity.saturating_sub(self.in_flight.load(Ordering::SeqCst));
                tx.send(msg(worker_message::Msg::Credit(v1::Credit { n: free })))?;
            }
            *out = Some(tx.clone());
        }
        let pending: Vec<v1::WorkerMessage> = self.pending.lock().expect("poisoned").values().cloned().collect();
        for report in pending {
            tx.send(report)?;
        }

        let beat = Duration::from_millis(registered.heartbeat_interval_ms.max(100).into());
        let mut ticker = tokio::time::interval(beat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = ticker.tick() => {
                    let _ = tx.send(self.heartbeat(self.held()));
                }
                m = inbound.message() => match m?.and_then(|m| m.msg) {
                    None => return Ok(()),
                    Some(scheduler_message::Msg::Lease(lease)) => {
                        self.in_flight.fetch_add(1, Ordering::SeqCst);
                        self.held.lock().expect("poisoned").insert(lease.lease_id.clone());
                        if let Err(refused) = leases.send(lease).await {
                            // The runner stopped taking leases (drain): give it back untouched.
                            let lease = refused.0.lease_id;
                            self.failed(&lease, "worker draining: not started", true, true);
                            self.release(&lease);
                        }
                    }
                    Some(scheduler_message::Msg::Recorded(r)) => self.answered(&r.lease_id),
                    Some(scheduler_message::Msg::Refused(r)) => {
                        tracing::warn!(lease = r.lease_id, "scheduler refused a report: {}", r.reason);
                        self.answered(&r.lease_id);
                    }
                    Some(scheduler_message::Msg::Revoke(r)) => {
                        // Stop renewing it; a result still reported is accepted only if it is the first.
                        tracing::warn!(lease = r.lease_id, "lease revoked: {}", r.reason);
                        self.unhold(&r.lease_id);
                    }
                    Some(scheduler_message::Msg::ExpectWitnessVector(e)) => self.announce(e),
                    Some(scheduler_message::Msg::Registered(_)) => {}
                },
            }
        }
    }

    fn answered(&self, lease: &str) {
        self.pending.lock().expect("poisoned").remove(lease);
        self.changed.notify_waiters();
    }
}
