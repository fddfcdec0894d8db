//! The lease client every role shares: one `Scheduler.Work` stream, kept open across scheduler
//! restarts (reconnect with backoff, register again, grant the free credits again).
//!
//! Credits are flow control: the client grants one credit per free slot, so the scheduler never
//! pushes more leases than the worker can run. Reports (`Completed`, `Failed`) are queued and
//! delivered on whatever stream is open when they are ready; the scheduler refuses them if the
//! lease went stale meanwhile (a reconnect after the lease expired), and nothing is recorded twice.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// A connection to the scheduler that survives its restarts.
#[derive(Debug)]
pub struct LeaseClient {
    reg: Registration,
    /// The current stream's sender; `None` while disconnected.
    out: Mutex<Option<mpsc::UnboundedSender<v1::WorkerMessage>>>,
    connected: Notify,
    /// Leases received and not yet released.
    in_flight: AtomicU32,
    /// Set by `Registered`.
    worker_id: Mutex<String>,
}

fn msg(m: worker_message::Msg) -> v1::WorkerMessage {
    v1::WorkerMessage { msg: Some(m) }
}

impl LeaseClient {
    /// Connects in the background (retrying until `cancel`); leases arrive on the returned receiver.
    pub fn start(reg: Registration, cancel: CancellationToken) -> (Arc<Self>, mpsc::Receiver<v1::Lease>) {
        let client = Arc::new(LeaseClient {
            reg,
            out: Mutex::new(None),
            connected: Notify::new(),
            in_flight: AtomicU32::new(0),
            worker_id: Mutex::new(String::new()),
        });
        let (leases, rx) = mpsc::channel(1024);
        tokio::spawn(client.clone().supervise(leases, cancel));
        (client, rx)
    }

    /// The id the scheduler gave this worker (empty before the first registration).
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

    /// Delivers a report, waiting for a connection if there is none (until `cancel`).
    async fn report(&self, m: v1::WorkerMessage, cancel: &CancellationToken) {
        loop {
            let wait = self.connected.notified();
            if self.send_now(m.clone()) {
                return;
            }
            tokio::select! {
                _ = wait => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// Reports a completed job.
    pub async fn completed(&self, c: v1::Completed, cancel: &CancellationToken) {
        self.report(msg(worker_message::Msg::Completed(c)), cancel).await;
    }

    /// Reports a failed job.
    pub async fn failed(&self, lease_id: &str, error: &str, retryable: bool, cancel: &CancellationToken) {
        let f = v1::Failed { lease_id: lease_id.into(), error: error.into(), retryable };
        self.report(msg(worker_message::Msg::Failed(f)), cancel).await;
    }

    /// Frees the slot a lease held and grants the scheduler one more credit.
    pub fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        // If disconnected, the next registration grants every free slot again.
        self.send_now(msg(worker_message::Msg::Credit(v1::Credit { n: 1 })));
    }

    async fn supervise(self: Arc<Self>, leases: mpsc::Sender<v1::Lease>, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.connect_once(&leases, &cancel).await {
                Ok(()) if cancel.is_cancelled() => return,
                Ok(()) => tracing::warn!("scheduler stream closed; reconnecting"),
                Err(e) => tracing::warn!("scheduler at {}: {e}; retrying in {backoff:?}", self.reg.scheduler),
            }
            *self.out.lock().expect("poisoned") = None;
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = cancel.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One stream's life: register, grant credits, heartbeat, forward leases.
    async fn connect_once(&self, leases: &mpsc::Sender<v1::Lease>, cancel: &CancellationToken) -> anyhow::Result<()> {
        let channel = tonic::transport::Endpoint::from_shared(self.reg.scheduler.clone())?
            .tcp_nodelay(true)
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
        })))?;
        let mut inbound = client.work(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await?.into_inner();
        let first = inbound.message().await?.and_then(|m| m.msg);
        let Some(scheduler_message::Msg::Registered(registered)) = first else {
            anyhow::bail!("the scheduler did not answer Register with Registered");
        };
        *self.worker_id.lock().expect("poisoned") = registered.worker_id.clone();
        tracing::info!(worker = registered.worker_id, "registered with the scheduler");
        if self.takes_leases() {
            let free = self.reg.capacity.saturating_sub(self.in_flight.load(Ordering::SeqCst));
            tx.send(msg(worker_message::Msg::Credit(v1::Credit { n: free })))?;
        }
        *self.out.lock().expect("poisoned") = Some(tx.clone());
        self.connected.notify_waiters();

        let beat = Duration::from_millis(registered.heartbeat_interval_ms.max(100).into());
        let mut ticker = tokio::time::interval(beat);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = ticker.tick() => {
                    let _ = tx.send(msg(worker_message::Msg::Heartbeat(v1::Heartbeat {})));
                }
                m = inbound.message() => match m?.and_then(|m| m.msg) {
                    None => return Ok(()),
                    Some(scheduler_message::Msg::Lease(lease)) => {
                        self.in_flight.fetch_add(1, Ordering::SeqCst);
                        if leases.send(lease).await.is_err() {
                            return Ok(());
                        }
                    }
                    Some(scheduler_message::Msg::Refused(r)) => {
                        tracing::warn!(lease = r.lease_id, "scheduler refused a report: {}", r.reason);
                    }
                    Some(scheduler_message::Msg::Revoke(r)) => {
                        tracing::warn!(lease = r.lease_id, "lease revoked: {}", r.reason);
                    }
                    Some(scheduler_message::Msg::Registered(_)) => {}
                },
            }
        }
    }
}
