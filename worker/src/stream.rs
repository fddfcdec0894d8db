//! Witness vectors over `Prover.PushWitnessVector`: a header (lease, job, size, CRC-32), then the
//! bytes in chunks. Both ends live here: [`push`] for the WVG, [`receive`] for the prover.

use proofmesh_proto::v1::{self, prover_client::ProverClient, witness_vector_chunk::Part};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;
use tonic::Status;

/// Bytes per chunk: large enough that per-message overhead vanishes, well under gRPC's default
/// 4 MiB message limit.
pub const CHUNK_BYTES: usize = 1 << 20;

/// The largest witness vector a prover accepts by default, MiB (`--max-witness-vector-mib`; a
/// 2^20-row circuit of 135 wires is ~1.1 GB).
pub const DEFAULT_MAX_WITNESS_VECTOR_MIB: u64 = 4096;

/// HTTP/2 flow-control windows for witness-vector streams, bytes: the defaults (64 KiB) cap
/// loopback throughput far below the link's.
pub const STREAM_WINDOW: u32 = 16 << 20;
/// The connection-level window, bytes.
pub const CONNECTION_WINDOW: u32 = 32 << 20;

/// A channel to a prover's endpoint, tuned for bulk streams, over TLS if `tls` says so (the
/// files are read now; the prover's certificate is checked against `server_name` when given,
/// else the endpoint's host). Lazy: connects on first use. Errors: a bad URL, TLS files that do not load.
pub fn prover_channel(
    endpoint: &str,
    tls: &proofmesh_proto::TlsArgs,
    server_name: Option<&str>,
) -> Result<Channel, proofmesh_proto::tls::TlsError> {
    Ok(tls
        .endpoint_named(endpoint, server_name)?
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // A prover that vanished without a reset is noticed (issue 16 rule 7).
        .tcp_keepalive(Some(std::time::Duration::from_secs(30)))
        .http2_keep_alive_interval(std::time::Duration::from_secs(20))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .connect_lazy())
}

/// The deadline of a push of `bytes` bytes: 30 s, plus a second per 8 MiB (a link well below a
/// data centre's). A push past it ends `DEADLINE_EXCEEDED` on both sides, and the WVG's job is
/// retried, instead of a stalled stream holding the lease and a prover slot.
pub fn push_deadline(bytes: usize) -> std::time::Duration {
    std::time::Duration::from_secs(30) + std::time::Duration::from_secs_f64(bytes as f64 / f64::from(8u32 << 20))
}

/// Streams `bytes` with `header` (its `size` and `crc32` are filled in here). Returns the
/// prover's receipt; `RESOURCE_EXHAUSTED` means it had no free slot.
pub async fn push(channel: Channel, mut header: v1::WitnessVectorHeader, bytes: Vec<u8>) -> Result<v1::PushReceipt, Status> {
    header.size = bytes.len() as u64;
    header.crc32 = crc32fast::hash(&bytes);
    let deadline = push_deadline(bytes.len());
    let bytes = bytes::Bytes::from(bytes);
    let chunks = (0..bytes.len().div_ceil(CHUNK_BYTES)).map(move |i| {
        let end = ((i + 1) * CHUNK_BYTES).min(bytes.len());
        v1::WitnessVectorChunk { part: Some(Part::Data(bytes.slice(i * CHUNK_BYTES..end))) }
    });
    let first = std::iter::once(v1::WitnessVectorChunk { part: Some(Part::Header(header)) });
    let mut client = ProverClient::new(channel).max_decoding_message_size(8 << 20);
    let mut request = tonic::Request::new(tokio_stream::iter(first.chain(chunks)));
    request.set_timeout(deadline);
    Ok(client.push_witness_vector(request).await?.into_inner())
}

/// Reads a whole push: the header, then exactly `size` bytes whose CRC-32 matches. Errors:
/// `INVALID_ARGUMENT` (no header first, a second header, too large), `DATA_LOSS` (size or
/// checksum mismatch), and the stream's own errors as they are.
///
/// `max_bytes` bounds the declared size: a larger push is refused from its header, before any
/// buffer is allocated, and more bytes than declared are refused as they arrive, so a push never
/// holds more than `max_bytes`.
///
/// `stream` is the request's [`tonic::Streaming`] on the prover; any stream of chunks in tests.
pub async fn receive(
    mut stream: impl Stream<Item = Result<v1::WitnessVectorChunk, Status>> + Unpin,
    max_bytes: u64,
) -> Result<(v1::WitnessVectorHeader, Vec<u8>), Status> {
    let header = match stream.next().await.transpose()?.and_then(|c| c.part) {
        Some(Part::Header(h)) => h,
        _ => return Err(Status::invalid_argument("a witness vector stream starts with its header")),
    };
    if header.size > max_bytes {
        return Err(Status::invalid_argument(format!(
            "witness vector of {} bytes exceeds this prover's limit of {max_bytes} bytes (--max-witness-vector-mib)",
            header.size
        )));
    }
    let mut bytes = Vec::with_capacity(header.size as usize);
    let mut crc = crc32fast::Hasher::new();
    while let Some(chunk) = stream.next().await.transpose()? {
        let data = match chunk.part {
            Some(Part::Data(data)) => data,
            Some(Part::Header(_)) => {
                return Err(Status::invalid_argument("a second header in one witness vector stream"))
            }
            None => return Err(Status::invalid_argument("a witness vector chunk with neither header nor data")),
        };
        if bytes.len() + data.len() > header.size as usize {
            return Err(Status::data_loss(format!("more than the {} bytes the header announced", header.size)));
        }
        crc.update(&data);
        bytes.extend_from_slice(&data);
    }
    if bytes.len() as u64 != header.size {
        return Err(Status::data_loss(format!("received {} of {} bytes", bytes.len(), header.size)));
    }
    let got = crc.finalize();
    if got != header.crc32 {
        return Err(Status::data_loss(format!("CRC-32 {got:08x} does not match the header's {:08x}", header.crc32)));
    }
    Ok((header, bytes))
}
