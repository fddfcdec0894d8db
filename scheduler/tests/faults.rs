//! Faults against a real PostgreSQL over real gRPC: leases that expire, late results, attempts
//! running out, a scheduler restart under a working worker, a drain, and heartbeats that proving
//! on every core cannot delay.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use proofmesh_core::{AggregationRound, BatchNumber, CircuitId, Geometry, ProtocolVersion};
use proofmesh_proto::v1::{self, scheduler_message::Msg, Role};
use proofmesh_scheduler::{MaxAttempts, Settings};
use proofmesh_worker::lease::{LeaseClient, Registration};
use proofmesh_worker::runner::{self, execute, JobError, Outcome, Stage};
use tokio_util::sync::CancellationToken;

/// `(outcome, count)` of the lease history of batch `n`'s round-0 witness generation.
async fn round0_leases(pool: &sqlx::PgPool, n: i64) -> Vec<(Option<String>, i64)> {
    sqlx::query_as(
        "SELECT l.outcome, count(*) FROM leases l JOIN jobs j ON j.id = l.job_id
         WHERE j.batch_number = $1 AND j.kind = 'witness_generation' AND j.aggregation_round = 0
         GROUP BY l.outcome ORDER BY l.outcome",
    )
    .bind(n)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn round0_attempts(pool: &sqlx::PgPool, n: i64) -> (String, i32) {
    sqlx::query_as("SELECT status, attempts FROM jobs WHERE batch_number = $1 AND kind = 'witness_generation' AND aggregation_round = 0")
        .bind(n)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_valid_result_is_accepted_once_and_the_newer_lease_revoked() {
    let s = start_scheduler_with(Settings { lease_secs: 0.5, heartbeat_ms: 100, ..settings() }).await;
    let mut slow = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h1", 1, "")).await;
    slow.credit(1);
    submit(&s.url, 1).await;
    let first = slow.lease().await;
    // No heartbeat: the lease expires and the job goes to the next worker.
    let mut fast = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h2", 1, "")).await;
    fast.credit(1);
    let second = fast.lease().await;
    assert_eq!(second.job, first.job);
    match slow.next(Duration::from_secs(5)).await {
        Some(Msg::Revoke(r)) => assert_eq!(r.lease_id, first.lease_id, "the hung worker is told its lease expired"),
        other => panic!("expected Revoke, got {other:?}"),
    }
    // A stale heartbeat renews nothing and is answered with Revoke.
    slow.heartbeat(&[&first.lease_id]);
    match slow.next(Duration::from_secs(5)).await {
        Some(Msg::Revoke(r)) => assert_eq!(r.lease_id, first.lease_id),
        other => panic!("expected Revoke, got {other:?}"),
    }

    // The first worker's result arrives late, before the second's: it is valid and it is first.
    slow.complete(&first.lease_id, &[(1, 1), (2, 1), (3, 1)]);
    slow.expect_recorded(&first.lease_id).await;
    match fast.next(Duration::from_secs(5)).await {
        Some(Msg::Revoke(r)) => assert_eq!(r.lease_id, second.lease_id),
        other => panic!("expected Revoke of the newer lease, got {other:?}"),
    }
    // The second result is refused: never two successes.
    fast.complete(&second.lease_id, &[(1, 1), (2, 1), (3, 1)]);
    match fast.next(Duration::from_secs(5)).await {
        Some(Msg::Refused(r)) => assert_eq!(r.lease_id, second.lease_id),
        other => panic!("expected Refused, got {other:?}"),
    }
    let history = round0_leases(&s.shared.pool, 1).await;
    assert_eq!(history, vec![(Some("succeeded".into()), 1), (Some("superseded".into()), 1)]);
    // The superseded lease's attempt is given back: the job succeeded at its first attempt (a
    // scheduler outage that loses sight of a finished job must not spend its attempts).
    assert_eq!(round0_attempts(&s.shared.pool, 1).await, ("succeeded".into(), 1));
    // The graph was inserted once: 3 basic proving jobs.
    assert_eq!(get_batch(&s.url, 1).await.rounds[0].total, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_fails_after_max_attempts_with_its_last_error_visible() {
    let s = start_scheduler_with(Settings { lease_secs: 0.5, heartbeat_ms: 100, max_attempts: MaxAttempts::uniform(2), ..settings() }).await;
    let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h1", 1, "")).await;
    wg.credit(1);
    submit(&s.url, 2).await;
    // Attempt 1: a retryable failure.
    let l1 = wg.lease().await;
    wg.fail(&l1.lease_id, true);
    wg.expect_recorded(&l1.lease_id).await;
    wg.credit(1);
    // Attempt 2: the lease expires (the worker hangs).
    let l2 = wg.lease().await;
    assert_eq!(l2.job, l1.job);
    match wg.next(Duration::from_secs(5)).await {
        Some(Msg::Revoke(r)) => assert_eq!(r.lease_id, l2.lease_id),
        other => panic!("expected Revoke, got {other:?}"),
    }
    let batch = get_batch(&s.url, 2).await;
    assert_eq!(batch.state, v1::BatchState::Failed as i32);
    assert!(
        batch.error.contains("failed after 2 attempt(s)") && batch.error.contains("lease expired"),
        "the batch's error names the attempts and the last error: {}",
        batch.error
    );
    assert_eq!(round0_attempts(&s.shared.pool, 2).await, ("failed".into(), 2));
    // Nothing more is leased for it.
    wg.credit(1);
    assert!(wg.next(Duration::from_millis(500)).await.is_none());
}

/// A stage that sleeps (a stand-in for nothing: only its lease matters) until told to finish.
struct Gate(Arc<tokio::sync::Notify>);

#[async_trait::async_trait]
impl Stage for Gate {
    fn name(&self) -> &'static str {
        "witness_generation"
    }

    async fn handle(&self, _lease: &v1::Lease) -> Result<Outcome, JobError> {
        self.0.notified().await;
        Ok(Outcome::Completed(v1::Completed {
            lease_id: String::new(),
            circuits: [(1, 1), (2, 1), (3, 1)].map(|(circuit_id, count)| v1::CircuitCount { circuit_id, count }).to_vec(),
            compute_secs: 0.0,
            output_bytes: 0,
            verified_against_batch: false,
        }))
    }
}

fn registration(url: &str, capacity: u32) -> Registration {
    Registration {
        scheduler: url.into(),
        role: Role::WitnessGenerator,
        name: "w".into(),
        zone: "a".into(),
        region: "r".into(),
        host: "h".into(),
        capacity,
        prover_endpoint: String::new(),
        protocol_versions: vec![],
        prover_group: None,
        memory_budget_mib: 0,
        tls: Default::default(),
    }
}

async fn wait_for<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let until = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn round0_status(pool: &sqlx::PgPool, n: i64) -> String {
    round0_attempts(pool, n).await.0
}

/// A real lease client and runner (capacity 1) whose witness generation finishes only when
/// `gate` is notified.
struct GatedWorker {
    client: Arc<LeaseClient>,
    gate: Arc<tokio::sync::Notify>,
    drain: CancellationToken,
    stop: CancellationToken,
    runner: tokio::task::JoinHandle<()>,
}

impl GatedWorker {
    fn start(url: &str) -> GatedWorker {
        let stop = CancellationToken::new();
        let (client, leases) = LeaseClient::start(registration(url, 1), stop.clone());
        let gate = Arc::new(tokio::sync::Notify::new());
        let drain = CancellationToken::new();
        let stage = Arc::new(Gate(gate.clone()));
        let runner = tokio::spawn(runner::run(client.clone(), leases, stage, drain.clone(), Duration::from_secs(5), Duration::from_secs(60)));
        GatedWorker { client, gate, drain, stop, runner }
    }

    /// Drains it and ends its stream.
    async fn stop(self) {
        self.drain.cancel();
        self.runner.await.unwrap();
        self.stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_keeps_its_lease_across_a_scheduler_restart() {
    let (pool, _) = fresh_database().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = serve_on(pool.clone(), Settings { lease_secs: 5.0, heartbeat_ms: 200, ..settings() }, listener);
    let w = GatedWorker::start(&s.url);
    submit(&s.url, 3).await;
    wait_for("the lease", || async { round0_status(&pool, 3).await == "leased" }).await;

    // The scheduler goes away mid-job and a new one starts on the same address and database.
    s.cancel.cancel();
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let s2 = serve_on(pool.clone(), Settings { lease_secs: 5.0, heartbeat_ms: 200, ..settings() }, listener);
    // The worker reconnects and re-attaches its lease; the job finishes with its first attempt.
    wait_for("the re-attach", || async {
        let to: Option<String> = sqlx::query_scalar("SELECT leased_to FROM jobs WHERE batch_number = 3 AND status = 'leased'")
            .fetch_optional(&pool)
            .await
            .unwrap()
            .flatten();
        to.is_some_and(|id| id == w.client.worker_id())
    })
    .await;
    w.gate.notify_one();
    wait_for("the completion", || async { round0_status(&pool, 3).await == "succeeded" }).await;
    assert_eq!(round0_attempts(&pool, 3).await.1, 1);
    assert_eq!(round0_leases(&pool, 3).await, vec![(Some("succeeded".into()), 1)]);
    w.stop().await;
    drop(s2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_worker_hands_back_what_it_cannot_finish_without_spending_an_attempt() {
    let s = start_scheduler_with(Settings { heartbeat_ms: 200, ..settings() }).await;
    let stop = CancellationToken::new();
    let (client, leases) = LeaseClient::start(registration(&s.url, 1), stop.clone());
    let drain = CancellationToken::new();
    let gate = Arc::new(tokio::sync::Notify::new());
    let runner = tokio::spawn(runner::run(client.clone(), leases, Arc::new(Gate(gate)), drain.clone(), Duration::from_millis(300), Duration::from_secs(60)));
    submit(&s.url, 4).await;
    let pool = s.shared.pool.clone();
    wait_for("the lease", || async { round0_status(&pool, 4).await == "leased" }).await;
    drain.cancel();
    tokio::time::timeout(Duration::from_secs(15), runner).await.expect("the drain ends within its grace").unwrap();
    assert_eq!(round0_attempts(&pool, 4).await, ("queued".into(), 0), "handed back: queued again, no attempt spent");
    stop.cancel();
}

/// A stage that panics in async code on its first job, hangs on its second, and completes its
/// third (round-0 witness generation counts).
struct PanicsThenHangs(std::sync::atomic::AtomicU32);

#[async_trait::async_trait]
impl Stage for PanicsThenHangs {
    fn name(&self) -> &'static str {
        "witness_generation"
    }

    async fn handle(&self, _lease: &v1::Lease) -> Result<Outcome, JobError> {
        match self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            0 => panic!("boom in async code"),
            1 => std::future::pending().await,
            _ => Ok(Outcome::Completed(v1::Completed {
                circuits: [(1, 1), (2, 1), (3, 1)].map(|(circuit_id, count)| v1::CircuitCount { circuit_id, count }).to_vec(),
                ..Default::default()
            })),
        }
    }
}

/// Issue 16 rule 1: a stage that panics, or hangs past `--stage-timeout-secs` while its
/// heartbeats go on, ends in `Failed` (retryable) naming why, and its lease and credit come back:
/// the worker (capacity 1) takes the job again and finishes it at the third attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_panics_or_hangs_is_reported_failed_and_its_credit_returns() {
    let s = start_scheduler_with(Settings { heartbeat_ms: 100, ..settings() }).await;
    let stop = CancellationToken::new();
    let (client, leases) = LeaseClient::start(registration(&s.url, 1), stop.clone());
    let drain = CancellationToken::new();
    let stage = Arc::new(PanicsThenHangs(Default::default()));
    let runner = tokio::spawn(runner::run(client.clone(), leases, stage, drain.clone(), Duration::from_secs(5), Duration::from_millis(500)));
    submit(&s.url, 6).await;
    let pool = s.shared.pool.clone();
    wait_for("the third attempt's success", || async { round0_status(&pool, 6).await == "succeeded" }).await;
    assert_eq!(round0_attempts(&pool, 6).await.1, 3);
    let errors: Vec<(String, String)> = sqlx::query_as(
        "SELECT l.outcome, coalesce(l.error, '') FROM leases l JOIN jobs j ON j.id = l.job_id
         WHERE j.batch_number = 6 AND j.aggregation_round = 0 AND j.kind = 'witness_generation' ORDER BY l.granted_at",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert_eq!(errors[0].0, "failed");
    assert!(errors[0].1.contains("panicked: boom in async code"), "{errors:?}");
    assert_eq!(errors[1].0, "failed");
    assert!(errors[1].1.contains("hung"), "{errors:?}");
    assert_eq!(errors[2].0, "succeeded");
    assert!(client.held().is_empty(), "nothing is held after the reports: {:?}", client.held());
    drain.cancel();
    runner.await.unwrap();
    stop.cancel();
}

/// Proves a real basic circuit's witness vector again and again for `secs` on a blocking thread.
struct Prove {
    setups: Arc<proofmesh_worker::setups::Setups>,
    store: Arc<proofmesh_circuits::setup::SetupStore>,
    key: proofmesh_circuits::setup::CircuitKey,
    wv: Arc<Vec<u8>>,
    secs: f64,
}

#[async_trait::async_trait]
impl Stage for Prove {
    fn name(&self) -> &'static str {
        "witness_generation"
    }

    async fn handle(&self, _lease: &v1::Lease) -> Result<Outcome, JobError> {
        let (setups, store, key, wv, secs) = (self.setups.clone(), self.store.clone(), self.key, self.wv.clone(), self.secs);
        let (proofs, cpu) = execute(move || {
            let start = Instant::now();
            let mut proofs = 0;
            while start.elapsed().as_secs_f64() < secs {
                proofmesh_worker::execute::prove(&setups, &store, key, &wv)?;
                proofs += 1;
            }
            Ok(proofs)
        })
        .await?;
        tracing::info!("{proofs} proofs in {cpu:.1} CPU s");
        Ok(Outcome::Completed(v1::Completed {
            lease_id: String::new(),
            circuits: [(1, 1), (2, 1), (3, 1)].map(|(circuit_id, count)| v1::CircuitCount { circuit_id, count }).to_vec(),
            compute_secs: cpu,
            output_bytes: 0,
            verified_against_batch: false,
        }))
    }
}

/// Both cores prove for ~8 s under leases of 1 s renewed every 200 ms: a heartbeat late by a
/// second would expire a lease (the job would show a second attempt and a Revoke).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_leases_alive_while_every_core_is_proving() {
    // A real witness vector of a basic circuit of sample batch 1 at the small geometry.
    let batch = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../samples/batch_000001.bin")).unwrap();
    let job = proofmesh_worker::execute::WgJob {
        batch: BatchNumber(1),
        version: ProtocolVersion::CURRENT,
        geometry: Geometry::small(),
        round: AggregationRound::BasicCircuits,
        circuit_id: CircuitId(0),
        depth: 0,
    };
    let circuits = proofmesh_worker::execute::witness_generation(job, vec![batch], &[]).unwrap();
    let (input_key, input) = circuits.inputs.first().unwrap().clone();
    let setups = Arc::new(proofmesh_worker::setups::Setups::new(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("setup-cache")));
    let store = setups.store(ProtocolVersion::CURRENT, Geometry::small()).unwrap();
    let basic = proofmesh_circuits::basic::BasicCircuit::ALL
        .into_iter()
        .find(|t| input_key.contains(&format!("r0-c{}-", t.id().0)))
        .unwrap();
    let key = proofmesh_circuits::setup::CircuitKey::Basic(basic);
    let wv = proofmesh_worker::execute::synthesize(&setups, &store, key, &input).unwrap();

    let s = start_scheduler_with(Settings { lease_secs: 1.0, heartbeat_ms: 200, ..settings() }).await;
    let stop = CancellationToken::new();
    let (client, leases) = LeaseClient::start(registration(&s.url, 2), stop.clone());
    let stage = Prove { setups, store, key, wv: Arc::new(wv), secs: 8.0 };
    let drain = CancellationToken::new();
    let runner = tokio::spawn(runner::run(client, leases, Arc::new(stage), drain.clone(), Duration::from_secs(30), Duration::from_secs(60)));
    submit(&s.url, 5).await;
    submit(&s.url, 6).await;
    let pool = s.shared.pool.clone();
    // Watch the renewals as the scheduler records them.
    let mut last_seen_gap = Duration::ZERO;
    let mut previous: Option<(f64, Instant)> = None;
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE batch_number IN (5, 6) AND aggregation_round = 0 AND kind = 'witness_generation' AND status = 'succeeded'")
            .fetch_one(&pool)
            .await
            .unwrap();
        if done == 2 {
            break;
        }
        assert!(Instant::now() < until, "the proving jobs did not finish");
        let seen: Option<f64> = sqlx::query_scalar("SELECT max(extract(epoch FROM last_seen))::float8 FROM workers").fetch_one(&pool).await.unwrap();
        if let Some(seen) = seen {
            match previous {
                Some((p, at)) if seen == p => last_seen_gap = last_seen_gap.max(at.elapsed()),
                _ => previous = Some((seen, Instant::now())),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("longest gap between recorded heartbeats while proving: {last_seen_gap:?} (interval 200 ms, lease 1 s)");
    for n in [5, 6] {
        assert_eq!(round0_attempts(&pool, n).await, ("succeeded".into(), 1), "batch {n}: the lease never expired");
        assert_eq!(round0_leases(&pool, n).await, vec![(Some("succeeded".into()), 1)]);
    }
    assert!(last_seen_gap < Duration::from_millis(1000), "a heartbeat came {last_seen_gap:?} late");
    drain.cancel();
    runner.await.unwrap();
    stop.cancel();
}

/// Issue 16 rule 7: a scheduler outage longer than a lease costs no attempt. The lease's
/// deadline passes while no scheduler runs; the next scheduler gives it the reconnect grace
/// before anything expires, so the worker that reconnects a while later still holds it and its
/// result is the job's first and only attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_outage_longer_than_a_lease_costs_no_attempt() {
    let (pool, _) = fresh_database().await;
    let outage_settings = || Settings { lease_secs: 1.0, reconnect_grace_secs: 4.0, heartbeat_ms: 200, ..settings() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = serve_on(pool.clone(), outage_settings(), listener);
    let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h1", 1, "")).await;
    wg.credit(1);
    submit(&s.url, 4).await;
    let lease = wg.lease().await;

    // The scheduler is down for twice the lease lifetime.
    s.cancel.cancel();
    drop(s);
    drop(wg);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let s2 = serve_on(pool.clone(), outage_settings(), listener);
    // The worker takes a while to come back (its reconnect backoff): nothing expires meanwhile.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, attempts) = round0_attempts(&pool, 4).await;
    assert_eq!((status.as_str(), attempts), ("leased", 1), "the lease outlived the outage");
    assert_eq!(round0_leases(&pool, 4).await, vec![(None, 1)], "no lease ended");

    let mut back = RawWorker::connect(&s2.url, v1::Register { held_leases: vec![lease.lease_id.clone()], ..register(Role::WitnessGenerator, "a", "h1", 1, "") }).await;
    back.heartbeat(&[&lease.lease_id]);
    back.complete(&lease.lease_id, &[(1, 1), (2, 1), (3, 1)]);
    back.expect_recorded(&lease.lease_id).await;
    assert_eq!(round0_attempts(&pool, 4).await, ("succeeded".into(), 1));
    assert_eq!(round0_leases(&pool, 4).await, vec![(Some("succeeded".into()), 1)]);

    // The grace is a grace, not a reprieve: a lease nobody renews after the outage expires.
    let mut other = RawWorker::connect(&s2.url, register(Role::WitnessGenerator, "a", "h2", 1, "")).await;
    other.credit(1);
    submit(&s2.url, 5).await;
    let hung = other.lease().await;
    match other.next(Duration::from_secs(5)).await {
        Some(Msg::Revoke(r)) => assert_eq!(r.lease_id, hung.lease_id, "expired after its own lifetime"),
        m => panic!("expected Revoke, got {m:?}"),
    }
}

/// Issue 16 rule 8: an error text PostgreSQL cannot store (a NUL byte) is recorded, cleaned,
/// and the stream goes on; before, the statement failed, the stream ended, and the worker sent
/// the same report again after every reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_whose_text_postgresql_cannot_store_is_recorded_and_the_stream_goes_on() {
    let s = start_scheduler_with(settings()).await;
    let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h1", 1, "")).await;
    wg.credit(1);
    submit(&s.url, 6).await;
    let lease = wg.lease().await;
    let f = v1::Failed { lease_id: lease.lease_id.clone(), error: "bad\0byte".into(), retryable: true, handed_back: false, bad_inputs: vec![], lost_inputs: vec![] };
    wg.send(v1::worker_message::Msg::Failed(f));
    wg.expect_recorded(&lease.lease_id).await;
    let error: Option<String> = sqlx::query_scalar("SELECT error FROM jobs WHERE batch_number = 6 AND aggregation_round = 0 AND kind = 'witness_generation'")
        .fetch_one(&s.shared.pool)
        .await
        .unwrap();
    assert_eq!(error.as_deref(), Some("bad\u{fffd}byte"));
    // The same stream leases the job again.
    wg.credit(1);
    let again = wg.lease().await;
    assert_eq!(again.job, lease.job);
}

/// Issue 16 rule 8: a completion PostgreSQL refuses on its data (here a CHECK constraint the
/// test adds, SQLSTATE 23514) is answered `Refused`, its lease ends as a retryable failure with
/// the reason, and the worker's other reports on the same stream are recorded; until the
/// attempts run out and the job fails with that reason. Before, the stream ended and the worker
/// reconnected and resent it for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_postgresql_refuses_is_refused_without_blocking_the_stream() {
    let s = start_scheduler_with(Settings { max_attempts: MaxAttempts::uniform(2), ..settings() }).await;
    sqlx::query("ALTER TABLE jobs ADD CONSTRAINT test_poison CHECK (NOT (batch_number = 7 AND status = 'succeeded'))")
        .execute(&s.shared.pool)
        .await
        .unwrap();
    let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h1", 2, "")).await;
    submit(&s.url, 7).await;
    submit(&s.url, 8).await;
    wg.credit(2);
    let (a, b) = (wg.lease().await, wg.lease().await);
    let (poison, good) = if a.job.as_ref().unwrap().batch_number == 7 { (a, b) } else { (b, a) };
    wg.complete(&poison.lease_id, &[(1, 1), (2, 1), (3, 1)]);
    wg.complete(&good.lease_id, &[(1, 1), (2, 1), (3, 1)]);
    let mut answers = vec![];
    while answers.len() < 2 {
        match wg.next_any(Duration::from_secs(10)).await {
            Some(Msg::Refused(r)) => answers.push((r.lease_id, format!("refused: {}", r.reason))),
            Some(Msg::Recorded(r)) => answers.push((r.lease_id, "recorded".into())),
            m => panic!("expected Refused and Recorded, got {m:?}"),
        }
    }
    answers.sort_by_key(|(l, _)| *l != poison.lease_id);
    assert_eq!(answers[0].0, poison.lease_id);
    assert!(answers[0].1.contains("cannot record its completion") && answers[0].1.contains("test_poison"), "{}", answers[0].1);
    assert_eq!(answers[1], (good.lease_id.clone(), "recorded".to_string()));
    // The poisoned job runs again at once (no expiry wait), on the same stream ...
    wg.credit(1);
    let retry = wg.lease().await;
    assert_eq!(retry.job, poison.job);
    assert_eq!(round0_attempts(&s.shared.pool, 7).await, ("leased".into(), 2));
    // ... and fails with the reason when its attempts run out.
    wg.complete(&retry.lease_id, &[(1, 1), (2, 1), (3, 1)]);
    match wg.next_any(Duration::from_secs(10)).await {
        Some(Msg::Refused(r)) => assert_eq!(r.lease_id, retry.lease_id),
        m => panic!("expected Refused, got {m:?}"),
    }
    wait_for("the batch to fail", || async { get_batch(&s.url, 7).await.state == v1::BatchState::Failed as i32 }).await;
    let batch = get_batch(&s.url, 7).await;
    assert!(batch.error.contains("cannot record its completion"), "{}", batch.error);
    assert_eq!(round0_status(&s.shared.pool, 8).await, "succeeded");
}

/// Issue 16 rule 1: no lease lives for ever. A worker whose stage hangs keeps heartbeating; the
/// renewals stop at the lease's maximum age, the lease expires with a reason that says so
/// (sent in the `Revoke`, kept as the job's error), and the job is leased again. Before,
/// heartbeats renewed it for ever and the batch never finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_heartbeated_past_its_maximum_age_expires() {
    let max_lease_age = proofmesh_scheduler::MaxLeaseAge { witness_generation: 2.0, ..Default::default() };
    let s = start_scheduler_with(Settings { lease_secs: 1.0, heartbeat_ms: 100, max_lease_age, ..settings() }).await;
    let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h1", 1, "")).await;
    wg.credit(1);
    submit(&s.url, 9).await;
    let lease = wg.lease().await;
    let granted = Instant::now();
    let revoke = loop {
        wg.heartbeat(&[&lease.lease_id]);
        match wg.next(Duration::from_millis(200)).await {
            Some(Msg::Revoke(r)) => break r,
            None => assert!(granted.elapsed() < Duration::from_secs(8), "still leased {:?} after its grant", granted.elapsed()),
            m => panic!("expected nothing or Revoke, got {m:?}"),
        }
    };
    let age = granted.elapsed();
    assert_eq!(revoke.lease_id, lease.lease_id);
    assert!(revoke.reason.contains("maximum age"), "{}", revoke.reason);
    assert!(age >= Duration::from_millis(1800), "renewed until its maximum age, not dropped early: {age:?}");
    let (status, attempts) = round0_attempts(&s.shared.pool, 9).await;
    assert_eq!((status.as_str(), attempts), ("queued", 1), "queued again, the attempt spent");
    // The next worker gets it.
    let mut next = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h2", 1, "")).await;
    next.credit(1);
    assert_eq!(next.lease().await.job, lease.job);
}

/// Issue 16 rule 2: an input proof lost from the artifact store after its job succeeded is made
/// again. The leaf witness generation reports it lost (`Failed.lost_inputs`, as `read_all` does
/// on `NotFound`); the basic proving job that produced it is queued again, nobody is struck,
/// the leaf waits for it without spending an attempt, and runs again once it is proven. Before,
/// the loss was an ordinary failure of the leaf: three of them failed the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_input_proof_is_proven_again_and_its_consumer_waits_without_spending_an_attempt() {
    let s = start_scheduler_with(Settings { max_attempts: MaxAttempts::uniform(1), ..settings() }).await;
    let _prover = RawWorker::connect(&s.url, register(Role::Prover, "a", "h1", 2, "http://p:1")).await;
    let mut wvg = RawWorker::connect(&s.url, register(Role::Wvg, "a", "h1", 1, "")).await;
    let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h1", 1, "")).await;
    wg.credit(1);
    submit(&s.url, 10).await;
    let l = wg.lease().await;
    wg.complete(&l.lease_id, &[(1, 1)]);
    wg.expect_recorded(&l.lease_id).await;
    wvg.credit(1);
    let basic = wvg.lease().await;
    assert_eq!(basic.job.as_ref().map(|j| j.aggregation_round), Some(0));
    wvg.complete(&basic.lease_id, &[]);
    wvg.expect_recorded(&basic.lease_id).await;

    wg.credit(1);
    let leaf = wg.lease().await;
    assert_eq!(leaf.job.as_ref().map(|j| j.aggregation_round), Some(1));
    assert_eq!(leaf.input_keys.len(), 1);
    let lost = v1::Failed {
        lease_id: leaf.lease_id.clone(),
        error: format!("1 input(s) missing from the artifact store: {}", leaf.input_keys[0]),
        retryable: true,
        handed_back: false,
        bad_inputs: vec![],
        lost_inputs: vec![0],
    };
    wg.send(v1::worker_message::Msg::Failed(lost));
    wg.expect_recorded(&leaf.lease_id).await;
    let jobs: Vec<(i16, String, i32)> = sqlx::query_as(
        "SELECT aggregation_round, status, attempts FROM jobs WHERE batch_number = 10
         AND ((kind = 'proving' AND aggregation_round = 0) OR (kind = 'witness_generation' AND aggregation_round = 1))
         ORDER BY aggregation_round",
    )
    .fetch_all(&s.shared.pool)
    .await
    .unwrap();
    assert_eq!(
        jobs,
        vec![(0, "queued".into(), 0), (1, "waiting".into(), 0)],
        "the basic proof is made again on the store's account; the leaf waits; neither spends an attempt"
    );
    let strikes: i64 = sqlx::query_scalar("SELECT count(*) FROM strikes").fetch_one(&s.shared.pool).await.unwrap();
    assert_eq!(strikes, 0, "storage is not a prover");

    // Proven again, the leaf runs again, with its one attempt (max_attempts 1) still there.
    wvg.credit(1);
    let again = wvg.lease().await;
    assert_eq!(again.job, basic.job);
    wvg.complete(&again.lease_id, &[]);
    wvg.expect_recorded(&again.lease_id).await;
    wg.credit(1);
    let leaf2 = wg.lease().await;
    assert_eq!(leaf2.job, leaf.job);
    wg.complete(&leaf2.lease_id, &[]);
    wg.expect_recorded(&leaf2.lease_id).await;
    assert_ne!(get_batch(&s.url, 10).await.state, v1::BatchState::Failed as i32);
    let attempts: Vec<i32> = sqlx::query_scalar(
        "SELECT attempts FROM jobs WHERE batch_number = 10 AND aggregation_round <= 1 AND status = 'succeeded' ORDER BY id",
    )
    .fetch_all(&s.shared.pool)
    .await
    .unwrap();
    assert!(attempts.len() >= 3 && attempts.iter().all(|&a| a == 1), "one attempt each, the loss charged to none: {attempts:?}");
}

/// Issue 16 rule 7: a worker process that reconnects while the scheduler still holds its old
/// stream open (half-open: the worker saw it die, the scheduler did not) replaces it, by its
/// `Register.instance_id`: the old stream is ended at once and leaves the registry, so no lease
/// goes into it; the lease it held is re-attached to the new stream with its attempt; another
/// process (another instance id) is left alone. Before, both connections stayed, and leases
/// went into the dead one until its TCP keepalive gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_of_the_same_process_replaces_its_half_open_stream() {
    let s = start_scheduler_with(settings()).await;
    let wg = |instance: &str, held: Vec<String>| v1::Register {
        instance_id: instance.into(),
        held_leases: held,
        ..register(Role::WitnessGenerator, "a", "h1", 1, "")
    };
    let mut old = RawWorker::connect(&s.url, wg("instance-1", vec![])).await;
    let other = RawWorker::connect(&s.url, wg("instance-2", vec![])).await;
    old.credit(1);
    submit(&s.url, 21).await;
    let lease = old.lease().await;

    let mut new = RawWorker::connect(&s.url, wg("instance-1", vec![lease.lease_id.clone()])).await;
    let t = Instant::now();
    assert!(old.next_any(Duration::from_secs(5)).await.is_none());
    assert!(t.elapsed() < Duration::from_secs(4), "the old stream was ended, not left open");
    {
        let reg = s.shared.registry();
        assert!(reg.get(&old.id).is_none(), "the old connection left the registry");
        assert!(reg.get(&new.id).is_some() && reg.get(&other.id).is_some(), "the new one and the other process stay");
    }
    // The lease is the new stream's: its completion is taken, with the one attempt it had.
    new.complete(&lease.lease_id, &[(1, 1)]);
    new.expect_recorded(&lease.lease_id).await;
    assert_eq!(round0_attempts(&s.shared.pool, 21).await, ("succeeded".into(), 1));
    // Work for the process goes to its new stream.
    new.credit(1);
    submit(&s.url, 22).await;
    let next = new.lease().await;
    assert_eq!(next.job.map(|j| j.batch_number), Some(22));
}

/// Issue 16 rule 7: PostgreSQL stops answering on every connection the scheduler has, without
/// closing any (a partition), while a worker holds a lease and hands its result in; then new
/// connections get through again. Every pass over the database (dispatch, lease expiry, the
/// renewal tick, the completion batch, a registration) gives its dead connection up at the pass
/// deadline and goes on on a new one: the result is recorded (the worker sends it again on a new
/// stream), no attempt is spent, and the next batch is leased. Before, the renewal tick and the
/// completion batch waited on the dead connections for ever (and sqlx's release check of a
/// connection dropped mid-query pinged it for ever, holding a pool slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_stops_answering_holds_nothing_up_past_the_pass_deadline() {
    let (direct, url) = fresh_database().await;
    let (scheme_user, rest) = url.split_once('@').expect("DATABASE_URL names user@host:port");
    let (target, db_name) = rest.split_once('/').expect("DATABASE_URL ends with /dbname");
    let proxy = PartitionProxy::start(target.to_string()).await;
    let proxied = format!("{scheme_user}@{}/{db_name}", proxy.addr);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(3))
        .connect_with(proofmesh_scheduler::connect_options(&proxied).unwrap())
        .await
        .unwrap();
    let deadline = Duration::from_secs(2);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let settings = Settings { lease_secs: 4.0, reconnect_grace_secs: 2.0, heartbeat_ms: 200, db_pass_deadline: deadline, ..settings() };
    let s = serve_on(pool, settings, listener);
    let w = GatedWorker::start(&s.url);
    submit(&s.url, 3).await;
    wait_for("the lease", || async { round0_status(&direct, 3).await == "leased" }).await;

    // The job finishes while its row is locked elsewhere, so the claim of its result waits in
    // PostgreSQL; the network goes meanwhile, and the claim's answer never comes back.
    let mut lock = direct.begin().await.unwrap();
    sqlx::query("SELECT id FROM jobs WHERE batch_number = 3 AND aggregation_round = 0 FOR UPDATE").fetch_all(&mut *lock).await.unwrap();
    w.gate.notify_one();
    wait_for("the claim to wait on the row", || async {
        let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE NOT granted").fetch_one(&direct).await.unwrap();
        waiting > 0
    })
    .await;
    proxy.cut();
    lock.commit().await.unwrap();
    tokio::time::sleep(deadline * 2).await;
    proxy.heal();
    wait_for("the completion after the cut", || async { round0_status(&direct, 3).await == "succeeded" }).await;
    assert_eq!(round0_attempts(&direct, 3).await.1, 1, "the cut cost an attempt");
    assert_eq!(round0_leases(&direct, 3).await, vec![(Some("succeeded".into()), 1)]);

    // The dispatcher and the batcher go on: the next batch is leased and recorded.
    submit(&s.url, 4).await;
    wait_for("the next lease", || async { round0_status(&direct, 4).await == "leased" }).await;
    w.gate.notify_one();
    wait_for("the next completion", || async { round0_status(&direct, 4).await == "succeeded" }).await;
    w.stop().await;
}
