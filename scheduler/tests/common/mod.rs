//! Test support: a fresh database per test on the PostgreSQL server at `DATABASE_URL` (the
//! Makefile's `test` target starts a throwaway one), and a scheduler served over TCP.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use proofmesh_core::{Geometry, LocalStore};
use proofmesh_proto::v1::{self, scheduler_client::SchedulerClient, scheduler_message, worker_message};
use proofmesh_scheduler::{MaxAttempts, Settings, Shared, ZonePolicy};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

/// A new, migrated database on the server at `DATABASE_URL`; returns its pool and URL.
pub async fn fresh_database() -> (PgPool, String) {
    let url = std::env::var("DATABASE_URL").expect(
        "DATABASE_URL is not set: run the tests with `make test` (it starts a throwaway PostgreSQL), \
         or point DATABASE_URL at a server where the tests may create databases",
    );
    let admin = PgPoolOptions::new().max_connections(1).connect(&url).await.expect("connecting to DATABASE_URL");
    let name = format!("proofmesh_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await.unwrap();
    let (base, _) = url.rsplit_once('/').expect("DATABASE_URL ends with /dbname");
    let test_url = format!("{base}/{name}");
    let pool = PgPoolOptions::new().max_connections(16).connect(&test_url).await.unwrap();
    proofmesh_scheduler::migrate(&pool).await.unwrap();
    (pool, test_url)
}

/// A scheduler serving on a free port of 127.0.0.1, in this process.
pub struct TestScheduler {
    pub url: String,
    pub shared: Arc<Shared>,
    pub cancel: CancellationToken,
    pub data: tempfile::TempDir,
}

impl Drop for TestScheduler {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub async fn start_scheduler(geometry: Geometry, zone_policy: ZonePolicy) -> TestScheduler {
    start_scheduler_with(Settings { geometry, zone_policy, ..settings() }).await
}

/// The tests' default settings: small geometry, 60 s leases, 1 s heartbeats.
pub fn settings() -> Settings {
    Settings {
        geometry: Geometry::small(),
        lease_secs: 60.0,
        reconnect_grace_secs: 10.0,
        max_attempts: MaxAttempts::uniform(3),
        max_lease_age: Default::default(),
        max_worker_capacity: 64,
        zone_policy: ZonePolicy::SameZoneOnly,
        heartbeat_ms: 1000,
        prover_groups: None,
        policy: Default::default(),
        housekeeping: None,
        grpc: Default::default(),
        db_pass_deadline: proofmesh_scheduler::DB_PASS_DEADLINE,
        tls: Default::default(),
        access: Default::default(),
        quarantine_after_strikes: 1,
    }
}

/// A scheduler with `settings` on a fresh database.
pub async fn start_scheduler_with(settings: Settings) -> TestScheduler {
    let (pool, _) = fresh_database().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_on(pool, settings, listener)
}

/// A scheduler over `pool` (a restart: the job state is whatever the database holds) on `listener`.
pub fn serve_on(pool: PgPool, settings: Settings, listener: tokio::net::TcpListener) -> TestScheduler {
    let data = tempfile::tempdir().unwrap();
    let shared = Shared::new(pool, settings, Arc::new(LocalStore::new(data.path())));
    let url = format!("http://{}", listener.local_addr().unwrap());
    let cancel = CancellationToken::new();
    tokio::spawn(proofmesh_scheduler::serve(shared.clone(), listener, cancel.clone()));
    TestScheduler { url, shared, cancel, data }
}

/// A worker speaking the `Work` protocol by hand, to drive the scheduler step by step.
pub struct RawWorker {
    pub id: String,
    tx: mpsc::UnboundedSender<v1::WorkerMessage>,
    inbound: tonic::Streaming<v1::SchedulerMessage>,
}

fn msg(m: worker_message::Msg) -> v1::WorkerMessage {
    v1::WorkerMessage { msg: Some(m) }
}

impl RawWorker {
    pub async fn connect(url: &str, register: v1::Register) -> RawWorker {
        let channel = tonic::transport::Endpoint::from_shared(url.to_string()).unwrap().connect().await.unwrap();
        Self::connect_on(channel, register).await
    }

    /// Registers on `channel` (e.g. a TLS channel with the worker's certificate).
    pub async fn connect_on(channel: tonic::transport::Channel, register: v1::Register) -> RawWorker {
        let mut client = SchedulerClient::new(channel);
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(msg(worker_message::Msg::Register(register))).unwrap();
        let mut inbound = client.work(UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
        let Some(scheduler_message::Msg::Registered(r)) = inbound.message().await.unwrap().unwrap().msg else {
            panic!("expected Registered");
        };
        RawWorker { id: r.worker_id, tx, inbound }
    }

    /// Sends any message.
    pub fn send(&self, m: worker_message::Msg) {
        self.tx.send(msg(m)).unwrap();
    }

    pub fn credit(&self, n: u32) {
        self.tx.send(msg(worker_message::Msg::Credit(v1::Credit { n }))).unwrap();
    }

    pub fn complete(&self, lease_id: &str, circuits: &[(u32, u32)]) {
        let circuits = circuits.iter().map(|&(circuit_id, count)| v1::CircuitCount { circuit_id, count }).collect();
        // Says the final proof was checked against its batch, as the compressor does (ignored on other leases).
        let c = v1::Completed { lease_id: lease_id.into(), circuits, compute_secs: 0.0, output_bytes: 0, verified_against_batch: true };
        self.tx.send(msg(worker_message::Msg::Completed(c))).unwrap();
    }

    pub fn fail(&self, lease_id: &str, retryable: bool) {
        let f = v1::Failed { lease_id: lease_id.into(), error: "test failure".into(), retryable, handed_back: false, bad_inputs: vec![], lost_inputs: vec![] };
        self.tx.send(msg(worker_message::Msg::Failed(f))).unwrap();
    }

    /// Gives `lease_id` back unfinished (drain).
    pub fn hand_back(&self, lease_id: &str) {
        let f = v1::Failed { lease_id: lease_id.into(), error: "draining".into(), retryable: true, handed_back: true, bad_inputs: vec![], lost_inputs: vec![] };
        self.tx.send(msg(worker_message::Msg::Failed(f))).unwrap();
    }

    /// The next message within `wait`, or `None`.
    pub async fn next_any(&mut self, wait: Duration) -> Option<scheduler_message::Msg> {
        match tokio::time::timeout(wait, self.inbound.message()).await {
            Ok(m) => m.unwrap().and_then(|m| m.msg),
            Err(_) => None,
        }
    }

    /// The next message other than `Recorded` within `wait`, or `None`.
    pub async fn next(&mut self, wait: Duration) -> Option<scheduler_message::Msg> {
        let until = tokio::time::Instant::now() + wait;
        loop {
            match self.next_any(until.saturating_duration_since(tokio::time::Instant::now())).await {
                Some(scheduler_message::Msg::Recorded(_)) => continue,
                other => return other,
            }
        }
    }

    /// Expects `Recorded` for `lease` next.
    pub async fn expect_recorded(&mut self, lease: &str) {
        match self.next_any(Duration::from_secs(5)).await {
            Some(scheduler_message::Msg::Recorded(r)) => assert_eq!(r.lease_id, lease),
            other => panic!("expected Recorded for {lease}, got {other:?}"),
        }
    }

    /// Heartbeats `leases`.
    pub fn heartbeat(&self, leases: &[&str]) {
        let lease_ids = leases.iter().map(|l| l.to_string()).collect();
        self.tx.send(msg(worker_message::Msg::Heartbeat(v1::Heartbeat { lease_ids, loaded_setups: vec![], busy_slots: None }))).unwrap();
    }

    /// A heartbeat renewing nothing, reporting `loaded` setups.
    pub fn heartbeat_with_setups(&self, loaded: &[v1::CircuitPair]) {
        let h = v1::Heartbeat { lease_ids: vec![], loaded_setups: loaded.to_vec(), busy_slots: None };
        self.tx.send(msg(worker_message::Msg::Heartbeat(h))).unwrap();
    }

    /// A prover's heartbeat renewing nothing, saying `busy` of its slots are proving.
    pub fn heartbeat_busy(&self, busy: u32) {
        let h = v1::Heartbeat { lease_ids: vec![], loaded_setups: vec![], busy_slots: Some(busy) };
        self.tx.send(msg(worker_message::Msg::Heartbeat(h))).unwrap();
    }

    /// The next message, which must be a lease.
    pub async fn lease(&mut self) -> v1::Lease {
        match self.next(Duration::from_secs(10)).await {
            Some(scheduler_message::Msg::Lease(l)) => l,
            other => panic!("expected a lease, got {other:?}"),
        }
    }
}

pub fn register(role: v1::Role, zone: &str, host: &str, capacity: u32, endpoint: &str) -> v1::Register {
    v1::Register {
        role: role as i32,
        zone: zone.into(),
        region: "test".into(),
        host: host.into(),
        capacity,
        prover_endpoint: endpoint.into(),
        protocol_versions: vec![],
        name: String::new(),
        held_leases: vec![],
        prover_group: None,
        memory_budget_mib: 0,
        loaded_setups: vec![],
        instance_id: String::new(),
    }
}

/// Submits batch `n` (protocol 0.1.0) through the `Batches` service.
pub async fn submit(url: &str, n: u32) -> bool {
    submit_on(tonic::transport::Endpoint::from_shared(url.to_string()).unwrap().connect().await.unwrap(), n).await
}

/// [`submit`] on `channel` (e.g. a TLS channel with a gateway's certificate).
pub async fn submit_on(channel: tonic::transport::Channel, n: u32) -> bool {
    let mut batches = v1::batches_client::BatchesClient::new(channel);
    let r = v1::SubmitBatchRequest {
        batch_number: n,
        protocol_version: Some(v1::ProtocolVersion { minor: 1, patch: 0 }),
        input_key: proofmesh_core::keys::batch_input(proofmesh_core::BatchNumber(n)),
        priority: 0,
        content_sha256: vec![],
    };
    batches.submit_batch(r).await.unwrap().into_inner().created
}

/// A prover's registration with the scheduler at `url`, serving at `endpoint`, capacity 1.
pub fn prover_registration(url: &str, endpoint: &str, tls: proofmesh_proto::TlsArgs) -> proofmesh_worker::lease::Registration {
    proofmesh_worker::lease::Registration {
        scheduler: url.to_string(),
        role: v1::Role::Prover,
        name: "prover".into(),
        zone: "z".into(),
        region: "r".into(),
        host: "h".into(),
        capacity: 1,
        prover_endpoint: endpoint.to_string(),
        protocol_versions: vec![],
        prover_group: None,
        memory_budget_mib: 0,
        tls,
    }
}

/// The batch as `Admin.GetBatch` shows it.
pub async fn get_batch(url: &str, n: u32) -> v1::BatchStatus {
    let mut admin = v1::admin_client::AdminClient::connect(url.to_string()).await.unwrap();
    admin.get_batch(v1::GetBatchRequest { batch_number: n }).await.unwrap().into_inner()
}

/// A TCP proxy to `target` that can cut the network without telling the client, as a
/// partition does: after [`PartitionProxy::cut`], every connection it carries, and every one
/// opened while cut, stops forwarding for good; after [`PartitionProxy::heal`], new connections
/// are forwarded again, and the server's end of each cut one is closed (the server gave up on
/// it: its session ends, its transaction rolls back), while the client's end stays open and
/// silent (half-open: no FIN, no reset). So a pool behind it holds dead connections it must give
/// up on by itself.
pub struct PartitionProxy {
    pub addr: std::net::SocketAddr,
    /// Connections opened in an earlier epoch than this are dead.
    epoch: Arc<std::sync::atomic::AtomicU64>,
    cut: Arc<std::sync::atomic::AtomicBool>,
}

/// Whether a proxied connection still forwards, and whether its cut has healed.
#[derive(Clone)]
struct Link {
    born: u64,
    epoch: Arc<std::sync::atomic::AtomicU64>,
    cut: Arc<std::sync::atomic::AtomicBool>,
}

impl Link {
    fn alive(&self) -> bool {
        use std::sync::atomic::Ordering;
        !self.cut.load(Ordering::SeqCst) && self.epoch.load(Ordering::SeqCst) == self.born
    }

    /// Returns once the cut that killed this connection has healed.
    async fn healed(&self) {
        while self.epoch.load(std::sync::atomic::Ordering::SeqCst) == self.born {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl PartitionProxy {
    pub async fn start(target: String) -> PartitionProxy {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (epoch, cut) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (e, c) = (epoch.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else { continue };
                let link = Link { born: e.load(Ordering::SeqCst), epoch: e.clone(), cut: c.clone() };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(forward(cr, sw, link.clone(), true));
                tokio::spawn(forward(sr, cw, link, false));
            }
        });
        PartitionProxy { addr, epoch, cut }
    }

    /// Stops every connection, now and until [`PartitionProxy::heal`].
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// New connections go through again; those cut stay dead (half-open on the client's side,
    /// closed on the server's).
    pub fn heal(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies `from` to `to` while the link is alive. Once it is not: toward the server, waits for
/// the heal and then closes the server's end; toward the client, holds the client's end open,
/// forwarding nothing, for ever.
async fn forward(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, link: Link, to_server: bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        if !link.alive() {
            if to_server {
                link.healed().await;
                return;
            }
            std::future::pending::<()>().await;
        }
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
