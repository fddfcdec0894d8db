//! The job-state core against a real PostgreSQL: set-based dispatch (idle workers cost no SQL),
//! the readiness counter under concurrent last inputs, the job graph inserted set-based, the
//! start-up rerank, a hand-back as its own lease outcome, and strikes on whoever handed a
//! rejected proof in.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use proofmesh_core::{keys, BatchNumber, CircuitId, Geometry, ProtocolVersion};
use proofmesh_proto::v1::{scheduler_message::Msg, Role};
use proofmesh_scheduler::graph::JobKind;
use proofmesh_scheduler::{db, Settings};

fn new_batch(number: u32, key: &str) -> db::NewBatch<'_> {
    db::NewBatch { number: BatchNumber(number), version: ProtocolVersion::CURRENT, input_key: key, content_sha256: None, priority: 0 }
}

/// Waits until `f` holds (5 s).
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_workers_cost_no_lease_statements_and_a_ready_fleet_costs_two() {
    let s = start_scheduler_with(settings()).await;
    let stats = &s.shared.dispatch_stats;
    // 60 compressors with credits: nothing of their class is ever queued here.
    let mut idle = vec![];
    for _ in 0..60 {
        let w = RawWorker::connect(&s.url, register(Role::Compressor, "a", "h", 1, "")).await;
        w.credit(1);
        idle.push(w);
    }
    until("the credits", || s.shared.registry().ready().len() == 60).await;
    let before = stats.lease_statements.load(Ordering::SeqCst);
    assert!(submit(&s.url, 1).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        stats.lease_statements.load(Ordering::SeqCst),
        before,
        "a queued witness generation costs nothing for 60 idle compressors"
    );

    // 40 witness generators arrive, each ready: one gets the job. One statement leases it and at
    // most one more finds the class empty; the other 38 cost nothing.
    let mut wgs = vec![];
    for _ in 0..40 {
        let w = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h", 1, "")).await;
        w.credit(1);
        wgs.push(w);
    }
    until("the witness generators' credits", || s.shared.registry().ready().len() >= 99).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut leased = 0;
    for w in &mut wgs {
        if let Some(Msg::Lease(_)) = w.next(Duration::from_millis(20)).await {
            leased += 1;
        }
    }
    assert_eq!(leased, 1, "one job, one lease");
    let statements = stats.lease_statements.load(Ordering::SeqCst) - before;
    assert!(statements <= 2, "{statements} lease statements for one job and 100 ready workers");
    assert_eq!(stats.leases.load(Ordering::SeqCst), 1);
}

/// Leases the round-0 witness generation of `n` and completes it with `counts`; returns the
/// leases of its round-0 proving jobs of circuit 1.
async fn round0_proving_leases(pool: &sqlx::PgPool, settings: &Settings, n: u32, counts: &[(CircuitId, u32)]) -> Vec<db::LeasedJob> {
    let key = keys::batch_input(BatchNumber(n));
    db::submit_batch(pool, &new_batch(n, &key), &settings.geometry, settings).await.unwrap();
    let policy = &settings.policy;
    // Round 0 only (pair 0): an earlier batch's leaf witness generation may be queued too.
    let round0 = [0];
    let ask = db::LeaseAsk { pairs: &round0, ..db::LeaseAsk::plain(JobKind::WitnessGeneration, "wg", 60.0, policy) };
    let wg = db::lease(pool, &ask).await.unwrap().unwrap();
    assert_eq!(wg.job.batch_number, i64::from(n));
    let report = db::Report { lease: wg.lease_id, counts: counts.to_vec(), compute_secs: 0.0, verified_against_batch: true, by: None, identity: None };
    db::complete(pool, &report, settings).await.unwrap();
    let pairs = [1]; // round 0, circuit 1
    let mut leases = vec![];
    while let Some(l) = db::lease(pool, &db::LeaseAsk { pairs: &pairs, ..db::LeaseAsk::plain(JobKind::Proving, "p", 60.0, policy) }).await.unwrap()
    {
        leases.push(l);
    }
    leases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_last_inputs_completing_at_once_queue_their_job_exactly_once() {
    let (pool, _) = fresh_database().await;
    let settings = settings();
    for n in 1..=12u32 {
        // Two basic circuits of type 1 feed one leaf (fan-in 2): both complete at once, in two
        // transactions on two connections.
        let leases = round0_proving_leases(&pool, &settings, n, &[(CircuitId(1), 2), (CircuitId(2), 1), (CircuitId(3), 1)]).await;
        assert_eq!(leases.len(), 2);
        let report = |l: &db::LeasedJob| db::Report { lease: l.lease_id, counts: vec![], compute_secs: 0.0, verified_against_batch: true, by: None, identity: None };
        let (a, b) = (report(&leases[0]), report(&leases[1]));
        let (ra, rb) = tokio::join!(db::complete(&pool, &a, &settings), db::complete(&pool, &b, &settings));
        let queued = ra.unwrap().queued + rb.unwrap().queued;
        assert_eq!(queued, 1, "batch {n}: exactly one of the two last inputs queues the leaf");
        let (status, unfinished): (String, i32) = sqlx::query_as(
            "SELECT status, unfinished_inputs FROM jobs
             WHERE batch_number = $1 AND kind = 'witness_generation' AND aggregation_round = 1 AND circuit_id = 1",
        )
        .bind(i64::from(n))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!((status.as_str(), unfinished), ("queued", 0), "batch {n}");
    }
}

/// Issue 15: one claim statement records a whole batch of reports. Here, in one call: both
/// inputs of one leaf (it is queued once, its counter at 0), a repeat of one of them (recorded
/// once, then "already recorded"), a lease that had failed and one that never existed (each
/// refused, nothing changed by them), and circuit 2's basic proof under its second lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_claim_statement_records_a_batch_of_reports_each_as_alone() {
    let (pool, _) = fresh_database().await;
    let settings = settings();
    let leases = round0_proving_leases(&pool, &settings, 1, &[(CircuitId(1), 2), (CircuitId(2), 1), (CircuitId(3), 1)]).await;
    assert_eq!(leases.len(), 2);
    let report = |lease| db::Report { lease, counts: vec![], compute_secs: 0.5, verified_against_batch: true, by: Some("p".into()), identity: None };
    // Circuit 2's basic proof: leased, then failed (retryable), then leased again.
    let ask = db::LeaseAsk { pairs: &[2], ..db::LeaseAsk::plain(JobKind::Proving, "p", 60.0, &settings.policy) };
    let failed = db::lease(&pool, &ask).await.unwrap().unwrap();
    db::end_lease(&pool, failed.lease_id, "flaky", true, db::EndReason::Failed).await.unwrap().expect("failed");
    let again = db::lease(&pool, &ask).await.unwrap().unwrap();
    assert_eq!(again.id, failed.id);
    let unknown = uuid::Uuid::new_v4();
    let reports = [report(leases[0].lease_id), report(failed.lease_id), report(leases[1].lease_id), report(leases[0].lease_id), report(unknown), report(again.lease_id)];
    let refs: Vec<&db::Report> = reports.iter().collect();
    let mut tx = pool.begin().await.unwrap();
    let results = db::complete_many(&mut tx, &refs, &settings).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(results.len(), 6);
    let (a, b, repeat, c) = (results[0].as_ref().unwrap(), results[2].as_ref().unwrap(), results[3].as_ref().unwrap(), results[5].as_ref().unwrap());
    assert!(!a.already_recorded && !b.already_recorded && !c.already_recorded);
    assert!(repeat.already_recorded, "a repeat in the same batch is recorded once");
    assert_eq!(a.queued + b.queued, 1, "the leaf is queued once, counted once");
    assert!(matches!(results[1], Err(db::DbError::StaleLease(l)) if l == failed.lease_id));
    assert!(matches!(results[4], Err(db::DbError::StaleLease(l)) if l == unknown));
    // The leaves (round-1 witness generations) of circuits 1, 2 and 3: queued by their two
    // inputs, queued by their one, still waiting for circuit 3's basic proof (never leased).
    let leaves: Vec<(String, i32)> = sqlx::query_as(
        "SELECT status, unfinished_inputs FROM jobs
         WHERE batch_number = 1 AND kind = 'witness_generation' AND aggregation_round = 1 ORDER BY circuit_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(leaves, [("queued".into(), 0), ("queued".into(), 0), ("waiting".into(), 1)]);
    let outcomes: Vec<(String,)> = sqlx::query_as("SELECT outcome FROM leases WHERE lease_id = ANY($1) ORDER BY outcome")
        .bind(vec![leases[0].lease_id, leases[1].lease_id, failed.lease_id, again.lease_id])
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(outcomes, [("failed".into(),), ("succeeded".into(),), ("succeeded".into(),), ("succeeded".into(),)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_input_counts_again_until_it_is_proven_again() {
    let (pool, _) = fresh_database().await;
    let settings = settings();
    let leases = round0_proving_leases(&pool, &settings, 1, &[(CircuitId(1), 2), (CircuitId(2), 1), (CircuitId(3), 1)]).await;
    for l in &leases {
        db::complete(&pool, &db::Report { lease: l.lease_id, counts: vec![], compute_secs: 0.0, verified_against_batch: true, by: None, identity: None }, &settings).await.unwrap();
    }
    let ask = db::LeaseAsk { pairs: &[256 + 1], ..db::LeaseAsk::plain(JobKind::WitnessGeneration, "wg", 60.0, &settings.policy) };
    let leaf = db::lease(&pool, &ask).await.unwrap().expect("the leaf's witness generation is queued");
    // The leaf's witness generator finds its second input proof invalid.
    let r = db::reject_inputs(&pool, leaf.lease_id, &[1], &[], "bad proof", 99).await.unwrap().unwrap();
    assert_eq!(r.requeued.len(), 1);
    assert_eq!((r.requeued[0].job.round, r.requeued[0].job.circuit_id), (0, 1), "the input's own labels");
    let unfinished = || async {
        sqlx::query_as::<_, (String, i32)>("SELECT status, unfinished_inputs FROM jobs WHERE id = $1")
            .bind(leaf.id)
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(unfinished().await, ("waiting".into(), 1));
    let again = db::lease(&pool, &db::LeaseAsk { pairs: &[1], ..db::LeaseAsk::plain(JobKind::Proving, "p2", 60.0, &settings.policy) })
        .await
        .unwrap()
        .expect("the rejected input is queued again");
    let done = db::complete(&pool, &db::Report { lease: again.lease_id, counts: vec![], compute_secs: 0.0, verified_against_batch: true, by: None, identity: None }, &settings).await.unwrap();
    assert_eq!(done.queued, 1);
    assert_eq!(unfinished().await, ("queued".into(), 0));
}

/// Issue 16 rule 4: a strike lands on whoever handed the rejected proof in. Here a late result:
/// the liar's lease expired, the job was leased to an honest worker, then the liar's result came
/// and won. When the next round rejects that proof, the liar (its name and identity) is struck and
/// quarantined, not the honest holder of the newer lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strike_for_a_late_result_lands_on_whoever_handed_it_in() {
    let (pool, _) = fresh_database().await;
    let settings = settings();
    for (id, name) in [("conn-liar", "liar"), ("conn-honest", "honest")] {
        let identity = format!("CN={name}");
        db::register_worker(&pool, id, name, "wvg", "a", "test", "h", 1, None, Some(&identity)).await.unwrap();
    }
    let key = keys::batch_input(BatchNumber(1));
    db::submit_batch(&pool, &new_batch(1, &key), &settings.geometry, &settings).await.unwrap();
    let policy = &settings.policy;
    let wg = db::lease(&pool, &db::LeaseAsk::plain(JobKind::WitnessGeneration, "wg", 60.0, policy)).await.unwrap().unwrap();
    let counts = [(CircuitId(1), 1), (CircuitId(2), 1), (CircuitId(3), 1)];
    let report = |lease, by: Option<&str>| db::Report {
        lease,
        counts: vec![],
        compute_secs: 0.0,
        verified_against_batch: true,
        by: by.map(str::to_string),
        identity: by.map(|b| format!("CN={}", b.trim_start_matches("conn-"))),
    };
    db::complete(&pool, &db::Report { counts: counts.to_vec(), ..report(wg.lease_id, Some("wg")) }, &settings).await.unwrap();

    // The liar's lease of the circuit-1 basic proof expires; the job goes to the honest worker.
    let pairs = [1];
    let ask = |worker, secs| db::LeaseAsk { pairs: &pairs, ..db::LeaseAsk::plain(JobKind::Proving, worker, secs, policy) };
    let late = db::lease(&pool, &ask("conn-liar", 0.05)).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    db::end_lease(&pool, late.lease_id, "expired", true, db::EndReason::Expired).await.unwrap().expect("expired");
    let newer = db::lease(&pool, &ask("conn-honest", 60.0)).await.unwrap().expect("leased again");
    assert_eq!(newer.id, late.id);
    // The late result wins; the honest worker's newer lease is superseded.
    let done = db::complete(&pool, &report(late.lease_id, Some("conn-liar")), &settings).await.unwrap();
    assert_eq!(done.superseded.as_ref().map(|(l, _)| *l), Some(newer.lease_id));

    // The leaf's witness generator finds that proof invalid.
    let leaf = db::lease(&pool, &db::LeaseAsk { pairs: &[256 + 1], ..db::LeaseAsk::plain(JobKind::WitnessGeneration, "wg", 60.0, policy) })
        .await
        .unwrap()
        .expect("the leaf's witness generation is queued");
    let r = db::reject_inputs(&pool, leaf.lease_id, &[0], &[], "bad proof", 1).await.unwrap().unwrap();
    assert_eq!(r.requeued.iter().map(|i| i.by.as_deref()).collect::<Vec<_>>(), [Some("liar")]);
    assert_eq!(r.quarantined, ["liar"]);
    let strikes: Vec<(String, Option<String>, uuid::Uuid)> =
        sqlx::query_as("SELECT worker_name, identity, lease_id FROM strikes").fetch_all(&pool).await.unwrap();
    assert_eq!(strikes, [("liar".to_string(), Some("CN=liar".to_string()), late.lease_id)]);
    let quarantined: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT worker_name, identity FROM quarantined_workers").fetch_all(&pool).await.unwrap();
    assert_eq!(quarantined, [("liar".to_string(), Some("CN=liar".to_string()))]);
}

/// Issue 16 rules 7 and 8: the scheduler's own connections run READ COMMITTED (the readiness
/// rule needs it) and bounded (a statement and an idle transaction time out, the server probes the
/// connection), whatever the database's defaults say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedulers_connections_are_read_committed_and_bounded_whatever_the_database_says() {
    let (pool, url) = fresh_database().await;
    let name = url.rsplit_once('/').unwrap().1.to_string();
    for setting in ["default_transaction_isolation = 'serializable'", "statement_timeout = 0", "idle_in_transaction_session_timeout = 0"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("ALTER DATABASE {name} SET {setting}"))).execute(&pool).await.unwrap();
    }
    let options = proofmesh_scheduler::connect_options(&url).unwrap();
    let scheduler = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
    let (isolation, statement, idle, keepalive): (String, String, String, String) = sqlx::query_as(
        "SELECT current_setting('transaction_isolation'), current_setting('statement_timeout'),
                current_setting('idle_in_transaction_session_timeout'), current_setting('tcp_keepalives_idle')",
    )
    .fetch_one(&scheduler)
    .await
    .unwrap();
    assert_eq!((isolation.as_str(), statement.as_str(), idle.as_str()), ("read committed", "1min", "1min"));
    // Over a Unix socket PostgreSQL reports 0 for TCP settings; the tests connect over TCP.
    assert_eq!(keepalive, "30", "server-side TCP keepalives");
    // Another client of the same database still gets the database's defaults.
    let other = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&url).await.unwrap();
    let isolation: String = sqlx::query_scalar("SELECT current_setting('transaction_isolation')").fetch_one(&other).await.unwrap();
    assert_eq!(isolation, "serializable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_of_twelve_thousand_basic_circuits_is_inserted_whole() {
    let (pool, _) = fresh_database().await;
    // The largest fan-ins the circuits allow: 8 x 8^3 = 4,096 basic circuits per type.
    let g = Geometry { leaf_fan_in: 8, node_fan_in: 8, max_node_depth: 3, ..Geometry::small() };
    let settings = Settings { geometry: g, ..settings() };
    let counts = [(CircuitId(1), 4096), (CircuitId(2), 4096), (CircuitId(3), 4096)];
    let planned = proofmesh_scheduler::graph::plan(BatchNumber(1), &g, &counts).unwrap();
    let key = keys::batch_input(BatchNumber(1));
    db::submit_batch(&pool, &new_batch(1, &key), &g, &settings).await.unwrap();
    let wg = db::lease(&pool, &db::LeaseAsk::plain(JobKind::WitnessGeneration, "wg", 60.0, &settings.policy)).await.unwrap().unwrap();
    let started = Instant::now();
    let done = db::complete(&pool, &db::Report { lease: wg.lease_id, counts: counts.to_vec(), compute_secs: 0.0, verified_against_batch: true, by: None, identity: None }, &settings).await.unwrap();
    println!("{} jobs planned and inserted in {:?}", planned.len(), started.elapsed());
    let ready = planned.iter().filter(|j| j.inputs.is_empty()).count() as u64;
    assert_eq!(done.queued, ready);
    let (jobs, edges, waiting_inputs): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM jobs WHERE batch_number = 1) - 1,
                (SELECT count(*) FROM job_inputs),
                (SELECT COALESCE(sum(unfinished_inputs), 0) FROM jobs WHERE status = 'waiting')::bigint",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let planned_edges: usize = planned.iter().map(|j| j.inputs.len()).sum();
    assert_eq!((jobs, edges), (planned.len() as i64, planned_edges as i64));
    assert_eq!(waiting_inputs, planned_edges as i64, "every waiting job counts its inputs");
    // Every edge points at the job the plan names, in input order: a type's leaf witness
    // generation reads its basic proofs by sequence number.
    let misplaced: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM job_inputs ji JOIN jobs c ON c.id = ji.job_id JOIN jobs i ON i.id = ji.input_job_id
         WHERE c.kind = 'witness_generation' AND c.aggregation_round = 1
           AND NOT (i.kind = 'proving' AND i.aggregation_round = 0 AND i.circuit_id = c.circuit_id
                    AND i.sequence_number = ji.position)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(misplaced, 0, "a leaf reads the basic proofs of its type in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_is_reordered_at_start_only_when_the_ageing_setting_changed() {
    let (pool, _) = fresh_database().await;
    let settings = settings();
    for n in 1..=3 {
        let key = keys::batch_input(BatchNumber(n));
        db::submit_batch(&pool, &new_batch(n, &key), &settings.geometry, &settings).await.unwrap();
    }
    assert_eq!(db::rerank(&pool, 300.0).await.unwrap(), 3, "first start: recorded and applied");
    assert_eq!(db::rerank(&pool, 300.0).await.unwrap(), 0, "same setting: nothing to do");
    assert_eq!(db::rerank(&pool, 60.0).await.unwrap(), 3, "a new ageing period reorders the unfinished jobs");
    let urgency: f64 = sqlx::query_scalar("SELECT urgency FROM jobs WHERE batch_number = 1").fetch_one(&pool).await.unwrap();
    let created: f64 = sqlx::query_scalar("SELECT extract(epoch FROM created_at)::float8 FROM batches WHERE batch_number = 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!((urgency + created).abs() < 1e-6, "priority 0: urgency is minus the submission time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_back_is_its_own_outcome_and_spends_no_attempt() {
    let s = start_scheduler_with(settings()).await;
    let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h", 1, "")).await;
    wg.credit(1);
    assert!(submit(&s.url, 4).await);
    let lease = wg.lease().await;
    wg.hand_back(&lease.lease_id);
    wg.expect_recorded(&lease.lease_id).await;
    let (outcome,): (Option<String>,) = sqlx::query_as("SELECT outcome FROM leases WHERE lease_id = $1::uuid")
        .bind(&lease.lease_id)
        .fetch_one(&s.shared.pool)
        .await
        .unwrap();
    assert_eq!(outcome.as_deref(), Some("handed_back"));
    let (status, attempts): (String, i32) = sqlx::query_as("SELECT status, attempts FROM jobs WHERE batch_number = 4")
        .fetch_one(&s.shared.pool)
        .await
        .unwrap();
    assert_eq!((status.as_str(), attempts), ("queued", 0));
    // The same hand-back again is recorded once.
    wg.hand_back(&lease.lease_id);
    wg.expect_recorded(&lease.lease_id).await;
}
