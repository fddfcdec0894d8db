//! Witness-vector stream throughput: the WVG's `push` to a `Prover.PushWitnessVector` server that
//! runs the prover's own `receive` (size and CRC-32 checked, bytes kept in memory), over loopback,
//! beside a raw TCP copy of the same bytes into memory.

use std::time::Instant;

use proofmesh_proto::v1;
use proofmesh_worker::stream::{prover_channel, push, receive, CONNECTION_WINDOW, STREAM_WINDOW};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status, Streaming};

/// A prover that receives and drops.
struct Sink;

#[tonic::async_trait]
impl v1::prover_server::Prover for Sink {
    async fn push_witness_vector(&self, r: Request<Streaming<v1::WitnessVectorChunk>>) -> Result<Response<v1::PushReceipt>, Status> {
        let (_, bytes) = receive(r.into_inner(), u64::MAX).await?;
        Ok(Response::new(v1::PushReceipt { received_bytes: bytes.len() as u64 }))
    }
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// Pushes `mib` MiB `reps` times each way and prints the best throughputs and their ratio.
pub async fn run(mib: usize, reps: usize) -> anyhow::Result<()> {
    let size = mib << 20;
    // Witness-vector-like bytes: field elements, not zeros.
    let data: Vec<u8> = (0..size / 8).flat_map(|i| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes()).collect();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .add_service(v1::prover_server::ProverServer::new(Sink).max_decoding_message_size(8 << 20))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = prover_channel(&format!("http://{addr}"), &Default::default(), None)?;
    let mut grpc_best = 0f64;
    for _ in 0..reps {
        let header = v1::WitnessVectorHeader { lease_id: "bench".into(), ..Default::default() };
        let bytes = data.clone();
        let start = Instant::now();
        let receipt = push(channel.clone(), header, bytes).await?;
        let secs = start.elapsed().as_secs_f64();
        anyhow::ensure!(receipt.received_bytes == size as u64, "short receipt");
        grpc_best = grpc_best.max(gbps(size, secs));
    }

    let raw = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let raw_addr = raw.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = raw.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(size);
                let _ = sock.read_to_end(&mut buf).await;
                let _ = sock.write_all(&(buf.len() as u64).to_le_bytes()).await;
            });
        }
    });
    let mut raw_best = 0f64;
    for _ in 0..reps {
        let start = Instant::now();
        let mut sock = tokio::net::TcpStream::connect(raw_addr).await?;
        sock.set_nodelay(true)?;
        sock.write_all(&data).await?;
        sock.shutdown().await?;
        let mut ack = [0u8; 8];
        sock.read_exact(&mut ack).await?;
        let secs = start.elapsed().as_secs_f64();
        anyhow::ensure!(u64::from_le_bytes(ack) == size as u64, "short raw copy");
        raw_best = raw_best.max(gbps(size, secs));
    }
    let ratio = grpc_best / raw_best;
    println!(
        "witness-vector stream, {mib} MiB over loopback (best of {reps}):\n  \
         gRPC PushWitnessVector {grpc_best:.2} GB/s, raw TCP {raw_best:.2} GB/s, ratio {ratio:.2}   target >= 0.33: {}",
        if ratio >= 1.0 / 3.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
