//! Trust (issue 8, `docs/security.md`): a scheduler and a prover serving mutual TLS with
//! certificates from a throwaway CA (rcgen), driven over real gRPC by clients holding various
//! certificates. Shows: clients without a valid certificate are refused; leases are bound to the
//! identity they were granted to; operators read but only admins change, and every change is
//! audited; a prover takes a witness vector only from the WVG the scheduler matched; a server
//! picks up rotated certificate files.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use proofmesh_core::LocalStore;
use proofmesh_proto::tls::test_ca::TestCa;
use proofmesh_proto::tls::TlsFiles;
use proofmesh_proto::v1::{self, scheduler_message::Msg, witness_vector_chunk::Part, Role};
use proofmesh_proto::{GrpcLimits, TlsArgs};
use proofmesh_scheduler::access::AccessPolicy;
use proofmesh_scheduler::Settings;
use proofmesh_worker::lease::LeaseClient;
use proofmesh_worker::prover::ProverService;
use proofmesh_worker::setups::Setups;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Code;

/// A scheduler serving TLS with `CN=scheduler` from `ca`: admins are `OU=admins`, operators `OU=operators`.
async fn tls_scheduler(ca: &TestCa, reload_secs: u64) -> (TestScheduler, TlsFiles) {
    let files = ca.issue("scheduler", "CN=scheduler").unwrap();
    let access = AccessPolicy {
        admins: vec!["OU=admins".parse().unwrap()],
        operators: vec!["OU=operators".parse().unwrap()],
    };
    let settings = Settings { tls: TlsArgs::with_files(files.clone(), reload_secs), access, ..settings() };
    (start_scheduler_with(settings).await, files)
}

/// A channel to `url` presenting `files`' certificate.
async fn channel(url: &str, files: &TlsFiles) -> Result<Channel, tonic::transport::Error> {
    TlsArgs::with_files(files.clone(), 30).endpoint(url).unwrap().connect().await
}

fn admin(channel: Channel) -> v1::admin_client::AdminClient<Channel> {
    v1::admin_client::AdminClient::new(channel)
}

async fn list_batches(channel: Channel) -> Result<v1::ListBatchesResponse, tonic::Status> {
    admin(channel).list_batches(v1::ListBatchesRequest { limit: 10 }).await.map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_certificate_of_the_ca_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("ca"), "test CA").unwrap();
    let (s, _) = tls_scheduler(&ca, 30).await;
    let operator = ca.issue("operator", "CN=olga,OU=operators").unwrap();
    assert!(list_batches(channel(&s.url, &operator).await.unwrap()).await.is_ok(), "an operator reads");

    // Plaintext: the server only speaks TLS.
    let plain = tonic::transport::Endpoint::from_shared(s.url.clone()).unwrap().connect().await;
    if let Ok(plain) = plain {
        assert!(list_batches(plain).await.is_err(), "a plaintext client got an answer");
    }
    // TLS that trusts the server, but with no client certificate.
    let no_cert = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(ca.ca_path()).unwrap()));
    let endpoint = tonic::transport::Endpoint::from_shared(s.url.replace("http://", "https://")).unwrap().tls_config(no_cert).unwrap();
    if let Ok(c) = endpoint.connect().await {
        assert!(list_batches(c).await.is_err(), "a client without a certificate got an answer");
    }
    // A certificate from another CA (which the client trusts for the server's sake).
    let other = TestCa::new(&dir.path().join("other"), "another CA").unwrap();
    let stranger = other.issue("stranger", "CN=mallory,OU=operators").unwrap();
    let mixed = TlsFiles { ca: ca.ca_path(), ..stranger };
    if let Ok(c) = channel(&s.url, &mixed).await {
        assert!(list_batches(c).await.is_err(), "a certificate of another CA got an answer");
    }
    // The same operator again: the server is still fine.
    assert!(list_batches(channel(&s.url, &operator).await.unwrap()).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cannot_complete_or_renew_a_lease_granted_to_another() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "test CA").unwrap();
    let (s, _) = tls_scheduler(&ca, 30).await;
    let (a, b) = (ca.issue("wg-a", "CN=wg-a").unwrap(), ca.issue("wg-b", "CN=wg-b").unwrap());
    let mut wg_a = RawWorker::connect_on(channel(&s.url, &a).await.unwrap(), register(Role::WitnessGenerator, "z", "h1", 1, "")).await;
    let mut wg_b = RawWorker::connect_on(channel(&s.url, &b).await.unwrap(), register(Role::WitnessGenerator, "z", "h2", 1, "")).await;
    wg_a.credit(1);
    assert!(submit_on(channel(&s.url, &ca.issue("gateway", "CN=gateway").unwrap()).await.unwrap(), 5).await);
    let lease = wg_a.lease().await;

    // B knows the lease id (say it leaked): its completion and its failure are refused ...
    wg_b.complete(&lease.lease_id, &[(1, 1), (2, 1), (3, 1)]);
    match wg_b.next(Duration::from_secs(5)).await {
        Some(Msg::Refused(r)) => assert!(r.reason.contains("another worker"), "{r:?}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    wg_b.fail(&lease.lease_id, false);
    assert!(matches!(wg_b.next(Duration::from_secs(5)).await, Some(Msg::Refused(_))));
    // ... its heartbeat does not take the lease over: it is told to let go of it.
    wg_b.heartbeat(&[&lease.lease_id]);
    match wg_b.next(Duration::from_secs(5)).await {
        Some(Msg::Revoke(r)) => assert_eq!(r.lease_id, lease.lease_id),
        other => panic!("expected Revoke, got {other:?}"),
    }
    let job: (String, Option<String>) = sqlx::query_as("SELECT status, leased_to FROM jobs WHERE lease_id = $1")
        .bind(uuid::Uuid::parse_str(&lease.lease_id).unwrap())
        .fetch_one(&s.shared.pool)
        .await
        .unwrap();
    assert_eq!(job, ("leased".to_string(), Some(wg_a.id.clone())), "the job is still A's");

    // A, the holder, completes it.
    wg_a.complete(&lease.lease_id, &[(1, 1), (2, 1), (3, 1)]);
    wg_a.expect_recorded(&lease.lease_id).await;
    let workers = admin(channel(&s.url, &ca.issue("ops", "CN=ops,OU=operators").unwrap()).await.unwrap())
        .list_workers(v1::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    let identities: Vec<&str> = workers.iter().map(|w| w.identity.as_str()).collect();
    assert!(identities.contains(&"CN=wg-a") && identities.contains(&"CN=wg-b"), "{identities:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_read_admins_change_and_every_change_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "test CA").unwrap();
    let (s, _) = tls_scheduler(&ca, 30).await;
    let operator = channel(&s.url, &ca.issue("operator", "CN=olga,OU=operators").unwrap()).await.unwrap();
    let admin_ch = channel(&s.url, &ca.issue("admin", "CN=alice,OU=admins").unwrap()).await.unwrap();
    let worker = channel(&s.url, &ca.issue("worker", "CN=prover-9").unwrap()).await.unwrap();
    assert!(submit_on(worker.clone(), 11).await);

    // A worker's certificate is neither role.
    let err = list_batches(worker.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    // An operator reads, and may not change.
    assert_eq!(list_batches(operator.clone()).await.unwrap().batches.len(), 1);
    let cancel = |reason: &str| v1::CancelBatchRequest { batch_number: 11, reason: reason.into() };
    let err = admin(operator.clone()).cancel_batch(cancel("by an operator")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = admin(operator.clone()).set_batch_priority(v1::SetBatchPriorityRequest { batch_number: 11, priority: 9 }).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let batch = get_batch_on(operator.clone(), 11).await;
    assert_eq!(batch.state, v1::BatchState::Proving as i32, "nothing changed");
    // An admin changes.
    let cancelled = admin(admin_ch.clone()).cancel_batch(cancel("bad data")).await.unwrap().into_inner();
    assert_eq!(cancelled.state, v1::BatchState::Failed as i32);

    // Who did what, newest first; the refused attempts too. Reading it is an operator's right.
    let log = admin(operator.clone()).list_audit_log(v1::ListAuditLogRequest { limit: 10 }).await.unwrap().into_inner().entries;
    let rows: Vec<(&str, &str, bool)> =
        log.iter().map(|e| (e.identity.as_str(), e.method.as_str(), e.outcome == "ok")).collect();
    assert_eq!(rows, [
        ("CN=alice, OU=admins", "CancelBatch", true),
        ("CN=olga, OU=operators", "SetBatchPriority", false),
        ("CN=olga, OU=operators", "CancelBatch", false),
    ]);
    assert!(log[0].details.contains("batch 11") && log[0].details.contains("bad data"), "{:?}", log[0]);
    assert!(log[1].outcome.contains("PermissionDenied"), "{:?}", log[1]);
    let err = admin(worker).list_audit_log(v1::ListAuditLogRequest { limit: 10 }).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

async fn get_batch_on(channel: Channel, n: u32) -> v1::BatchStatus {
    admin(channel).get_batch(v1::GetBatchRequest { batch_number: n }).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prover_takes_a_witness_vector_only_from_the_matched_wvg() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("ca"), "test CA").unwrap();
    let (s, _) = tls_scheduler(&ca, 30).await;
    let prover_files = ca.issue("prover", "CN=prover-a").unwrap();
    let prover_tls = TlsArgs::with_files(prover_files.clone(), 30);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("https://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let (client, _leases) = LeaseClient::start(prover_registration(&s.url, &endpoint, prover_tls.clone()), stop.clone());
    let service = ProverService {
        slots: Arc::new(Semaphore::new(1)),
        artifacts: Arc::new(LocalStore::new(dir.path().join("data"))),
        setups: Arc::new(Setups::new(dir.path().join("setup"))),
        client: client.clone(),
        draining: CancellationToken::new(),
        max_witness_vector_bytes: 8 << 20,
        check_pusher: true,
        wrong_proofs: false,
    };
    let grpc = GrpcLimits::default();
    let incoming = proofmesh_proto::tls::incoming(listener, prover_tls.server().unwrap());
    let server = grpc
        .server()
        .add_service(v1::prover_server::ProverServer::new(service).max_decoding_message_size(grpc.max_message_bytes()))
        .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
    tokio::spawn(server);

    // A batch whose round-0 witness generation is done: proving jobs are queued.
    let wg = ca.issue("wg", "CN=wg").unwrap();
    let mut wg = RawWorker::connect_on(channel(&s.url, &wg).await.unwrap(), register(Role::WitnessGenerator, "z", "h", 1, "")).await;
    wg.credit(1);
    assert!(submit_on(channel(&s.url, &ca.issue("gateway", "CN=gateway").unwrap()).await.unwrap(), 3).await);
    let round0 = wg.lease().await;
    wg.complete(&round0.lease_id, &[(1, 1), (2, 1), (3, 1)]);
    let wvg_files = ca.issue("wvg", "CN=wvg-a").unwrap();
    let mut wvg = RawWorker::connect_on(channel(&s.url, &wvg_files).await.unwrap(), register(Role::Wvg, "z", "h", 1, "")).await;
    while client.worker_id().is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wvg.credit(1);
    let lease = wvg.lease().await;
    assert_eq!(lease.prover_endpoint, endpoint);

    let push = |files: TlsFiles, lease_id: String| {
        let endpoint = endpoint.clone();
        async move {
            let ch = channel(&endpoint, &files).await.unwrap();
            let data = vec![7u8; 1024];
            let header = v1::WitnessVectorHeader {
                lease_id,
                size: data.len() as u64,
                crc32: crc32fast::hash(&data),
                output_key: "proofs/x".into(),
                ..Default::default()
            };
            let msgs = vec![
                v1::WitnessVectorChunk { part: Some(Part::Header(header)) },
                v1::WitnessVectorChunk { part: Some(Part::Data(data.into())) },
            ];
            v1::prover_client::ProverClient::new(ch).push_witness_vector(tokio_stream::iter(msgs)).await
        }
    };
    // Another identity of the CA, with the right lease id: refused before its bytes are taken.
    let rogue = ca.issue("rogue", "CN=rogue").unwrap();
    let err = push(rogue.clone(), lease.lease_id.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("CN=rogue"), "{err}");
    // A lease the scheduler never matched with this prover: refused too (after a short wait).
    let err = push(wvg_files.clone(), uuid::Uuid::new_v4().to_string()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    // The WVG the lease was granted to: accepted.
    let receipt = push(wvg_files, lease.lease_id.clone()).await.unwrap().into_inner();
    assert_eq!(receipt.received_bytes, 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_reloads_rotated_certificate_files() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestCa::new(&dir.path().join("first"), "first CA").unwrap();
    // reload_secs 0: the files are checked at every new connection.
    let (s, files) = tls_scheduler(&first, 0).await;
    let old_operator = first.issue("operator", "CN=olga,OU=operators").unwrap();
    assert!(list_batches(channel(&s.url, &old_operator).await.unwrap()).await.is_ok());

    // cert-manager rotates the CA and the scheduler's certificate in place.
    let second = TestCa::new(&dir.path().join("second"), "second CA").unwrap();
    let new_files = second.issue("scheduler", "CN=scheduler").unwrap();
    replace(&new_files.cert, &files.cert);
    replace(&new_files.key, &files.key);
    replace(&new_files.ca, &files.ca);

    let new_operator = second.issue("operator", "CN=olga,OU=operators").unwrap();
    assert!(list_batches(channel(&s.url, &new_operator).await.unwrap()).await.is_ok(), "the new CA's clients get in");
    if let Ok(c) = channel(&s.url, &old_operator).await {
        assert!(list_batches(c).await.is_err(), "a client of the retired CA got in");
    }

    // A broken rotation (a key that does not parse) keeps the configuration in use.
    std::fs::write(&files.key, b"not a key").unwrap();
    assert!(list_batches(channel(&s.url, &new_operator).await.unwrap()).await.is_ok());
}

/// Replaces `to` with `from`'s contents the way a mounted secret changes: a new file renamed over it.
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}
