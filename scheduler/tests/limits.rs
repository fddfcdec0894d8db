//! The gRPC limits (`proofmesh_proto::GrpcLimits`) on the real servers over TCP: a message above
//! the limit is refused, a connection past its concurrency is shed at once, a handler that never
//! gets its input is cut at the deadline, and a prover refuses an oversized witness vector from
//! its header without its memory growing by the declared size.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{settings, start_scheduler_with};
use proofmesh_core::LocalStore;
use proofmesh_proto::v1::{self, witness_vector_chunk::Part};
use proofmesh_proto::GrpcLimits;
use proofmesh_scheduler::Settings;
use proofmesh_worker::lease::LeaseClient;
use proofmesh_worker::prover::ProverService;
use proofmesh_worker::setups::Setups;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;

fn limits(max_message_mib: u32, concurrency: u32, timeout_secs: u64) -> GrpcLimits {
    GrpcLimits {
        max_message_mib,
        concurrency_per_connection: concurrency,
        request_timeout_secs: timeout_secs,
        ..GrpcLimits::default()
    }
}

#[tokio::test]
async fn the_scheduler_refuses_large_messages_sheds_excess_calls_and_cuts_silent_streams() {
    let s = start_scheduler_with(Settings { grpc: limits(1, 2, 2), ..settings() }).await;
    let channel = tonic::transport::Endpoint::from_shared(s.url.clone()).unwrap().connect().await.unwrap();

    // A 2 MiB SubmitBatch against a 1 MiB limit: refused before it is handled.
    let mut batches = v1::batches_client::BatchesClient::new(channel.clone());
    let e = batches
        .submit_batch(v1::SubmitBatchRequest { input_key: "x".repeat(2 << 20), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e}");

    // Two Work streams that never register hold both of the connection's request slots...
    let mut silent = vec![];
    for _ in 0..2 {
        let (tx, rx) = mpsc::channel::<v1::WorkerMessage>(1);
        let mut client = v1::scheduler_client::SchedulerClient::new(channel.clone());
        silent.push((tx, tokio::spawn(async move { client.work(ReceiverStream::new(rx)).await })));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...so a third call on the connection is shed at once, not queued.
    let started = Instant::now();
    let mut admin = v1::admin_client::AdminClient::new(channel.clone());
    let e = admin.list_workers(v1::ListWorkersRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(started.elapsed() < Duration::from_secs(1), "shed after {:?}", started.elapsed());
    // Another connection is not affected.
    let mut other = v1::admin_client::AdminClient::connect(s.url.clone()).await.unwrap();
    other.list_workers(v1::ListWorkersRequest {}).await.unwrap();

    // The silent streams are cut at the 2 s deadline, freeing the slots.
    for (_tx, call) in silent {
        let e = tokio::time::timeout(Duration::from_secs(10), call).await.expect("cut at the deadline").unwrap().unwrap_err();
        assert_eq!(e.code(), Code::Cancelled, "{e}");
    }
    admin.list_workers(v1::ListWorkersRequest {}).await.unwrap();
}

/// Resident memory of this process, bytes (`/proc/self/status`).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap();
    kib << 10
}

#[tokio::test]
async fn a_prover_refuses_an_oversized_witness_vector_without_holding_it() {
    let s = start_scheduler_with(settings()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let (client, _leases) = LeaseClient::start(common::prover_registration(&s.url, &endpoint, Default::default()), stop.clone());
    let dir = tempfile::tempdir().unwrap();
    let service = ProverService {
        slots: Arc::new(Semaphore::new(1)),
        artifacts: Arc::new(LocalStore::new(dir.path().join("data"))),
        setups: Arc::new(Setups::new(dir.path().join("setup"))),
        client,
        draining: CancellationToken::new(),
        check_pusher: false,
        wrong_proofs: false,
        max_witness_vector_bytes: 8 << 20,
    };
    let grpc = GrpcLimits::default();
    let server = grpc
        .server()
        .add_service(v1::prover_server::ProverServer::new(service).max_decoding_message_size(grpc.max_message_bytes()))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), stop.clone().cancelled_owned());
    tokio::spawn(server);

    let push = |size: u64, chunks: usize| {
        let endpoint = endpoint.clone();
        async move {
            let header = v1::WitnessVectorHeader { lease_id: "l".into(), size, ..Default::default() };
            let mut msgs = vec![v1::WitnessVectorChunk { part: Some(Part::Header(header)) }];
            msgs.extend((0..chunks).map(|_| v1::WitnessVectorChunk { part: Some(Part::Data(vec![7u8; 1 << 20].into())) }));
            let mut c = v1::prover_client::ProverClient::connect(endpoint).await.unwrap();
            c.push_witness_vector(tokio_stream::iter(msgs)).await
        }
    };
    let before = rss();
    // Declares 2 GiB against an 8 MiB limit: refused from the header, named.
    let e = push(2 << 30, 4).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("limit of 8388608 bytes"), "{e}");
    // Declares 1 MiB and sends 64: refused as the excess arrives.
    let e = push(1 << 20, 64).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e}");
    let grown = rss().saturating_sub(before);
    assert!(grown < 256 << 20, "the prover's memory grew by {} MiB", grown >> 20);
}
