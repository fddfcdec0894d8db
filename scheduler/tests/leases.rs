//! The scheduler against a real PostgreSQL, driven over real gRPC by hand-written workers.

mod common;

use std::time::Duration;

use common::*;
use proofmesh_core::Geometry;
use proofmesh_proto::v1::{self, scheduler_message::Msg, Role};
use proofmesh_scheduler::{Settings, ZonePolicy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_completion_is_refused() {
    let s = start_scheduler(Geometry::small(), ZonePolicy::SameZoneOnly).await;
    let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h1", 1, "")).await;
    wg.credit(1);
    assert!(submit(&s.url, 7).await);
    assert!(!submit(&s.url, 7).await, "submitting twice creates nothing");

    let first = wg.lease().await;
    assert_eq!(first.job.as_ref().unwrap().aggregation_round, 0);
    // A retryable failure puts the job back; the next lease of it has a new id.
    wg.fail(&first.lease_id, true);
    wg.credit(1);
    let second = wg.lease().await;
    assert_eq!(second.job, first.job);
    assert_ne!(second.lease_id, first.lease_id);

    // The old lease's completion is refused and records nothing.
    wg.complete(&first.lease_id, &[(1, 1), (2, 1), (3, 1)]);
    match wg.next(Duration::from_secs(5)).await {
        Some(Msg::Refused(r)) => assert_eq!(r.lease_id, first.lease_id),
        other => panic!("expected Refused, got {other:?}"),
    }
    assert_eq!(get_batch(&s.url, 7).await.rounds[0].total, 0);

    // The current lease completes once: the job graph appears. The same report again (a worker
    // resends what it saw no answer to) is answered the same and changes nothing.
    wg.complete(&second.lease_id, &[(1, 2), (2, 1), (3, 1)]);
    wg.expect_recorded(&second.lease_id).await;
    wg.complete(&second.lease_id, &[(1, 2), (2, 1), (3, 1)]);
    wg.expect_recorded(&second.lease_id).await;
    let batch = get_batch(&s.url, 7).await;
    let totals: Vec<u32> = batch.rounds.iter().map(|r| r.total).collect();
    // 4 basic, then per type: leaves 1/1/1, nodes 1/1/1, tip, scheduler, compression.
    assert_eq!(totals, vec![4, 3, 3, 1, 1, 1]);
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM jobs WHERE kind = 'witness_generation' AND aggregation_round = 0")
        .fetch_one(&s.shared.pool)
        .await
        .unwrap();
    assert_eq!(attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wvg_is_never_matched_across_zones_while_a_same_zone_prover_is_free() {
    let s = start_scheduler(Geometry::small(), ZonePolicy::SameZoneOnly).await;
    let _pb = RawWorker::connect(&s.url, register(Role::Prover, "b", "hb", 4, "http://prover-b:1")).await;
    let pa = RawWorker::connect(&s.url, register(Role::Prover, "a", "ha", 1, "http://prover-a:1")).await;
    let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "ha", 1, "")).await;
    wg.credit(1);
    submit(&s.url, 1).await;
    let l = wg.lease().await;
    wg.complete(&l.lease_id, &[(1, 2), (2, 1), (3, 1)]);

    // Four proving jobs are queued; the WVG of zone a could take four.
    let mut wvg = RawWorker::connect(&s.url, register(Role::Wvg, "a", "ha", 4, "")).await;
    wvg.credit(4);
    let first = wvg.lease().await;
    assert_eq!(first.prover_endpoint, "http://prover-a:1");
    assert_eq!(first.prover_worker_id, pa.id);
    // Zone a's only prover is busy; zone b's is free, and is not used.
    assert!(wvg.next(Duration::from_millis(500)).await.is_none(), "no lease may go to another zone");

    // A second prover in zone a, on another host: the waiting WVG gets it at once (no polling).
    let pa2 = RawWorker::connect(&s.url, register(Role::Prover, "a", "ha2", 1, "http://prover-a2:1")).await;
    let second = wvg.lease().await;
    assert_eq!(second.prover_worker_id, pa2.id);

    // The first prover completes: its slot frees, and the next lease goes to it.
    pa.complete(&first.lease_id, &[]);
    let third = wvg.lease().await;
    assert_eq!(third.prover_worker_id, pa.id);
    let progress = get_batch(&s.url, 1).await.rounds[0].clone();
    assert_eq!((progress.total, progress.succeeded, progress.in_progress), (4, 1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_becomes_ready_when_its_last_input_succeeds() {
    let s = start_scheduler(Geometry::small(), ZonePolicy::SameZoneOnly).await;
    let _p = RawWorker::connect(&s.url, register(Role::Prover, "a", "h", 8, "http://p:1")).await;
    let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h", 1, "")).await;
    let mut wvg = RawWorker::connect(&s.url, register(Role::Wvg, "a", "h", 8, "")).await;
    wg.credit(1);
    submit(&s.url, 2).await;
    let l = wg.lease().await;
    // Three tx-hasher circuits: the leaf witness generation of type 1 waits on all three.
    wg.complete(&l.lease_id, &[(1, 3), (2, 1), (3, 1)]);
    wvg.credit(8);
    let mut type1 = vec![];
    for _ in 0..5 {
        let lease = wvg.lease().await;
        if lease.job.as_ref().unwrap().circuit_id == 1 {
            type1.push(lease.lease_id);
        }
    }
    assert_eq!(type1.len(), 3);
    wg.credit(1);
    // Complete two of three, concurrently with nothing: the leaf WG must not be leased yet.
    for l in &type1[..2] {
        _p_complete(&s.url, l).await;
    }
    assert!(wg.next(Duration::from_millis(300)).await.is_none());
    _p_complete(&s.url, &type1[2]).await;
    let leaf_wg = wg.lease().await;
    let job = leaf_wg.job.unwrap();
    assert_eq!((job.aggregation_round, job.circuit_id), (1, 1));
    assert_eq!(leaf_wg.input_keys.len(), 3, "the leaf witness generation reads the three basic proofs");
    assert!(leaf_wg.input_keys[0].ends_with("r0-c1-d0/s0.proof"), "{:?}", leaf_wg.input_keys);
}

/// Completes a WVG lease the way a prover does: on a prover's own stream.
async fn _p_complete(url: &str, lease: &str) {
    let mut p = RawWorker::connect(url, register(Role::Prover, "z", "hz", 1, "http://unused:1")).await;
    p.complete(lease, &[]);
    p.expect_recorded(lease).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wvg_that_disconnects_frees_its_prover_slot_and_its_job_is_leased_again() {
    // It does not come back within the reconnect grace: its lease expires.
    let s = start_scheduler_with(Settings { reconnect_grace_secs: 0.5, ..settings() }).await;
    let pa = RawWorker::connect(&s.url, register(Role::Prover, "a", "ha", 1, "http://prover-a:1")).await;
    let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "ha", 1, "")).await;
    wg.credit(1);
    submit(&s.url, 3).await;
    let l = wg.lease().await;
    wg.complete(&l.lease_id, &[(1, 1), (2, 1), (3, 1)]);

    let mut gone = RawWorker::connect(&s.url, register(Role::Wvg, "a", "ha", 1, "")).await;
    gone.credit(1);
    let lost = gone.lease().await;
    assert_eq!(lost.prover_worker_id, pa.id);
    drop(gone);

    // The only prover's slot is free again, and the lost job goes out again before the others.
    let mut wvg = RawWorker::connect(&s.url, register(Role::Wvg, "a", "ha", 1, "")).await;
    wvg.credit(1);
    let again = wvg.lease().await;
    assert_eq!(again.prover_worker_id, pa.id);
    assert_eq!(again.job, lost.job);
    assert_ne!(again.lease_id, lost.lease_id);
}

/// Issue 16 rule 1: a worker's credits never exceed its capacity, and capacity is bounded by the
/// scheduler. Before, a worker registered with capacity 2 that sent 100 credits was leased
/// every queued job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_are_capped_at_the_capacity_and_capacity_by_the_scheduler() {
    let s = start_scheduler(Geometry::small(), ZonePolicy::SameZoneOnly).await;
    for n in 1..=5 {
        submit(&s.url, n).await;
    }
    let mut greedy = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h", 2, "")).await;
    greedy.credit(100);
    greedy.lease().await;
    greedy.lease().await;
    assert!(greedy.next(Duration::from_millis(500)).await.is_none(), "two leases for capacity 2");
    let leased: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'leased'").fetch_one(&s.shared.pool).await.unwrap();
    assert_eq!(leased, 2);

    for capacity in [0, 65] {
        let mut client = proofmesh_proto::v1::scheduler_client::SchedulerClient::connect(s.url.clone()).await.unwrap();
        let first = v1::WorkerMessage { msg: Some(v1::worker_message::Msg::Register(register(Role::WitnessGenerator, "a", "h", capacity, ""))) };
        let refused = client.work(tokio_stream::iter(vec![first])).await.expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("--max-worker-capacity"), "{}", refused.message());
    }
}

/// Issue 16 rule 1: credits buy leases only up to the capacity less the leases held. Before, a
/// worker of capacity 2 holding two leases that sent more credits was leased two more (and two
/// more after that, for every credit message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_never_buy_more_leases_than_the_capacity_less_those_held() {
    let s = start_scheduler(Geometry::small(), ZonePolicy::SameZoneOnly).await;
    for n in 1..=5 {
        submit(&s.url, n).await;
    }
    let mut greedy = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h", 2, "")).await;
    greedy.credit(2);
    let first = greedy.lease().await;
    let second = greedy.lease().await;
    greedy.heartbeat(&[&first.lease_id, &second.lease_id]);
    greedy.credit(2);
    assert!(greedy.next(Duration::from_millis(700)).await.is_none(), "a lease past capacity 2 while holding two");
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'leased'").fetch_one(&s.shared.pool).await.unwrap();
    assert_eq!(held, 2);

    // A report frees its lease's place at once: the credits already sent buy one more lease,
    // and only one (the other is still held).
    greedy.fail(&first.lease_id, true);
    let third = greedy.lease().await;
    assert_ne!(third.lease_id, first.lease_id);
    assert!(greedy.next(Duration::from_millis(700)).await.is_none(), "a lease past capacity 2 after one report");

    // A reconnect re-attaching both leases it holds is held to the same bound.
    drop(greedy);
    tokio::time::sleep(Duration::from_millis(300)).await; // the scheduler sees the old stream end
    let mut again = register(Role::WitnessGenerator, "a", "h", 2, "");
    again.held_leases = vec![second.lease_id.clone(), third.lease_id.clone()];
    let mut back = RawWorker::connect(&s.url, again).await;
    back.credit(2);
    assert!(back.next(Duration::from_millis(700)).await.is_none(), "a lease past capacity 2 after re-attaching two");
    back.fail(&second.lease_id, true);
    back.lease().await;
}

/// Issue 17 (inputs bounded before they cost): a heartbeat names at most the worker's capacity
/// in leases; the rest are neither renewed nor answered. Before, a worker of capacity 2 that
/// named 200 made of them 200 renewals and got 200 `Revoke` messages back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_names_no_more_leases_than_the_workers_capacity() {
    let s = start_scheduler(Geometry::small(), ZonePolicy::SameZoneOnly).await;
    submit(&s.url, 1).await;
    let mut w = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h", 2, "")).await;
    w.credit(1);
    let held = w.lease().await;
    let unknown: Vec<String> = (0..200).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let mut named: Vec<&str> = vec![&held.lease_id];
    named.extend(unknown.iter().map(String::as_str));
    w.heartbeat(&named);
    let mut revoked = 0;
    while let Some(m) = w.next(Duration::from_millis(800)).await {
        if let v1::scheduler_message::Msg::Revoke(r) = m {
            assert_ne!(r.lease_id, held.lease_id, "the lease it holds was revoked");
            revoked += 1;
        }
    }
    assert_eq!(revoked, 1, "only the first two leases named count: its own and one unknown");
    let current: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE lease_id = $1 AND status = 'leased'")
        .bind(uuid::Uuid::parse_str(&held.lease_id).unwrap())
        .fetch_one(&s.shared.pool)
        .await
        .unwrap();
    assert_eq!(current, 1);
}
