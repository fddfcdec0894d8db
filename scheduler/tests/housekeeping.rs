//! The house keeper against a real PostgreSQL and a real artifact directory: the artifacts of a
//! batch finished longer ago than the retention period are deleted with its lease history; those
//! of a batch finished more recently, and of a batch still proving however old, are kept.

mod common;

use std::time::Duration;

use common::*;
use proofmesh_core::{keys, BatchNumber};
use proofmesh_proto::v1::{self, Role};
use proofmesh_scheduler::{Housekeeping, Settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_of_batches_finished_past_the_retention_are_deleted_and_never_those_still_proving() {
    let housekeeping = Housekeeping { retention_secs: 3600.0, interval_secs: 0.1 };
    let s = start_scheduler_with(Settings { housekeeping: Some(housekeeping), ..settings() }).await;
    let store = s.shared.artifacts.clone();
    for n in 1..=3 {
        assert!(submit(&s.url, n).await);
        let b = BatchNumber(n);
        store.put(&keys::batch_input(b), vec![1; 10]).await.unwrap();
        store.put(&keys::final_proof(b), vec![2; 10]).await.unwrap();
    }
    // Batch 1's round-0 witness generation is leased and completed: it has lease history.
    let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h", 1, "")).await;
    wg.credit(1);
    let l = wg.lease().await;
    assert_eq!(l.job.unwrap().batch_number, 1);
    wg.complete(&l.lease_id, &[(1, 1), (2, 1), (3, 1)]);
    wg.expect_recorded(&l.lease_id).await;
    // Batch 1 was proven two hours ago, batch 2 failed a minute ago, batch 3 has been proving
    // for a day.
    let pool = &s.shared.pool;
    let set = |n: i64, status: &'static str, ago: &'static str| async move {
        let sql = format!(
            "UPDATE batches SET status = '{status}', created_at = now() - interval '1 day',
                    finished_at = CASE WHEN '{status}' = 'proving' THEN NULL ELSE now() - interval '{ago}' END,
                    proof_key = CASE WHEN '{status}' = 'proven' THEN 'batches/000001/final.proof' END
             WHERE batch_number = {n}"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await.unwrap();
    };
    set(1, "proven", "2 hours").await;
    set(2, "failed", "1 minute").await;
    set(3, "proving", "0 seconds").await;

    let leases_of = |n: i64| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM leases l JOIN jobs j ON j.id = l.job_id WHERE j.batch_number = $1")
            .bind(n)
            .fetch_one(pool)
            .await
            .unwrap()
    };
    assert_eq!(leases_of(1).await, 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.get(&keys::final_proof(BatchNumber(1))).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "batch 1's artifacts were not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(store.get(&keys::batch_input(BatchNumber(1))).await.is_err(), "every artifact of batch 1 goes");
    assert_eq!(leases_of(1).await, 0, "and its lease history");
    let cleaned: Option<i64> =
        sqlx::query_scalar("SELECT (extract(epoch FROM artifacts_deleted_at))::bigint FROM batches WHERE batch_number = 1")
            .fetch_one(pool)
            .await
            .unwrap();
    assert!(cleaned.is_some(), "the batch records when its artifacts were deleted");
    for n in [2, 3] {
        let b = BatchNumber(n);
        assert_eq!(store.get(&keys::batch_input(b)).await.unwrap(), vec![1; 10], "batch {n} keeps its batch file");
        assert_eq!(store.get(&keys::final_proof(b)).await.unwrap(), vec![2; 10], "batch {n} keeps its proof");
    }
    // The gateway asking for batch 1's proof now learns why it is gone.
    let mut batches = v1::batches_client::BatchesClient::connect(s.url.clone()).await.unwrap();
    let gone = batches.get_proof(v1::GetProofRequest { batch_number: 1 }).await.unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    assert!(gone.message().contains("retention"), "{gone:?}");
}

/// Submits batch `n` (0.1.0) with the SHA-256 `content` of its file; the gRPC status if refused.
async fn submit_with(url: &str, n: u32, content: Vec<u8>) -> Result<bool, tonic::Status> {
    let mut batches = v1::batches_client::BatchesClient::connect(url.to_string()).await.unwrap();
    let r = v1::SubmitBatchRequest {
        batch_number: n,
        protocol_version: Some(v1::ProtocolVersion { minor: 1, patch: 0 }),
        input_key: keys::batch_input(BatchNumber(n)),
        priority: 0,
        content_sha256: content,
    };
    batches.submit_batch(r).await.map(|r| r.into_inner().created)
}

#[tokio::test]
async fn a_batch_number_submitted_again_with_other_contents_is_refused_even_after_its_files_are_gone() {
    let housekeeping = Housekeeping { retention_secs: 60.0, interval_secs: 0.1 };
    let s = start_scheduler_with(Settings { housekeeping: Some(housekeeping), ..settings() }).await;
    let (first, other) = (vec![0xaa; 32], vec![0xbb; 32]);
    assert!(submit_with(&s.url, 1, first.clone()).await.unwrap());
    assert!(!submit_with(&s.url, 1, first.clone()).await.unwrap(), "the same contents again: no new work");
    let refused = submit_with(&s.url, 1, other.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused:?}");
    assert!(refused.message().contains("other contents") && refused.message().contains(&"bb".repeat(32)), "{refused:?}");
    let bad = submit_with(&s.url, 2, vec![1; 5]).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");

    // Proven long ago: the house keeper deletes its files; the scheduler still knows its contents.
    s.shared.artifacts.put(&keys::batch_input(BatchNumber(1)), vec![1; 10]).await.unwrap();
    sqlx::query("UPDATE batches SET status = 'proven', finished_at = now() - interval '2 hours' WHERE batch_number = 1")
        .execute(&s.shared.pool)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.shared.artifacts.get(&keys::batch_input(BatchNumber(1))).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "batch 1's artifacts were not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = submit_with(&s.url, 1, other).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused:?}");
    assert!(!submit_with(&s.url, 1, first).await.unwrap());
}

/// Issue 17: the house keeper prunes the records of worker connections that ended longer ago
/// than the retention and hold no lease; connected workers, recent ones and any holding a lease
/// stay. Before, every registration left a row for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_worker_connections_ended_past_the_retention_are_pruned() {
    let housekeeping = Housekeeping { retention_secs: 3600.0, interval_secs: 0.1 };
    let s = start_scheduler_with(Settings { housekeeping: Some(housekeeping), ..settings() }).await;
    let pool = &s.shared.pool;
    submit(&s.url, 1).await;
    let mut holder = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h", 1, "")).await;
    holder.credit(1);
    holder.lease().await;
    let connected = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h", 1, "")).await;
    let old_gone = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h", 1, "")).await;
    let recent_gone = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h", 1, "")).await;
    let ended = |id: String, ago: &'static str| async move {
        sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE workers SET disconnected_at = now() - interval '{ago}' WHERE id = $1")))
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
    };
    // The holder's stream ended two hours ago (as far as the table says) yet its lease is out.
    ended(holder.id.clone(), "2 hours").await;
    ended(old_gone.id.clone(), "2 hours").await;
    ended(recent_gone.id.clone(), "1 minute").await;
    let exists = |id: String| async move {
        sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM workers WHERE id = $1)").bind(id).fetch_one(pool).await.unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while exists(old_gone.id.clone()).await {
        assert!(tokio::time::Instant::now() < deadline, "the old record was not pruned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (who, id) in [("the lease holder", &holder.id), ("a connected worker", &connected.id), ("a recent one", &recent_gone.id)] {
        assert!(exists(id.clone()).await, "{who} was pruned");
    }
}
