//! Witness-vector streams under attack, as a prover receives them (`stream::receive`, fed from
//! memory): a valid push round-trips whatever its chunking, and every mutation of one (a message
//! dropped, repeated, moved or emptied, a byte flipped, the header's size or CRC-32 changed, a
//! transport error) is refused with its gRPC code, never a panic. Then what the prover reads of
//! the header before proving (`setups::version_and_geometry`, `setups::circuit_key`): absent or
//! out-of-range fields are fatal job errors.
//!
//! Enumerated rather than sampled: the worker has no proptest dev-dependency, and the space is
//! small enough to walk (every position of every mutation of a four-message push).

use proofmesh_core::{Geometry, ProtocolVersion};
use proofmesh_proto::v1::{self, witness_vector_chunk::Part, WitnessVectorChunk, WitnessVectorHeader};
use proofmesh_worker::setups::{circuit_key, version_and_geometry};
use proofmesh_worker::stream::receive;
use tonic::{Code, Status};

type Message = Result<WitnessVectorChunk, Status>;

/// 17 bytes that are not all alike, so a flipped byte changes the CRC-32.
fn payload() -> Vec<u8> {
    (0..17u8).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect()
}

fn header(bytes: &[u8]) -> WitnessVectorHeader {
    WitnessVectorHeader {
        lease_id: "lease-1".into(),
        job: Some(v1::JobIdentity { batch_number: 3, circuit_id: 2, ..Default::default() }),
        size: bytes.len() as u64,
        crc32: crc32fast::hash(bytes),
        output_key: "proofs/3/basic-2/0".into(),
        ..Default::default()
    }
}

fn header_msg(h: WitnessVectorHeader) -> Message {
    Ok(WitnessVectorChunk { part: Some(Part::Header(h)) })
}

fn data_msg(bytes: &[u8]) -> Message {
    Ok(WitnessVectorChunk { part: Some(Part::Data(bytes.to_vec().into())) })
}

/// The push of [`payload`] as the prover receives it: the header, then chunks of 5, 5 and 7 bytes.
fn valid_push() -> Vec<Message> {
    let bytes = payload();
    vec![header_msg(header(&bytes)), data_msg(&bytes[..5]), data_msg(&bytes[5..10]), data_msg(&bytes[10..])]
}

/// `Status` is not `Clone`: a copy of one message.
fn copy(m: &Message) -> Message {
    match m {
        Ok(c) => Ok(c.clone()),
        Err(s) => Err(Status::new(s.code(), s.message())),
    }
}

async fn receive_all(messages: Vec<Message>, max_bytes: u64) -> Result<(WitnessVectorHeader, Vec<u8>), Status> {
    receive(tokio_stream::iter(messages), max_bytes).await
}

/// Receives `messages` and checks the refusal's code and that its message contains `says`.
async fn refused(what: &str, messages: Vec<Message>, code: Code, says: &str) {
    match receive_all(messages, 1 << 20).await {
        Ok(_) => panic!("{what}: accepted"),
        Err(e) => {
            assert_eq!(e.code(), code, "{what}: {e:?}");
            assert!(e.message().contains(says), "{what}: {:?} does not say {says:?}", e.message());
        }
    }
}

#[tokio::test]
async fn a_push_round_trips_whatever_its_chunking() {
    for len in [0usize, 1, 5, 17, 4096] {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        for chunk in [1, 3, 7, 1000] {
            let mut messages = vec![header_msg(header(&bytes))];
            messages.extend(bytes.chunks(chunk).map(data_msg));
            let (h, got) = receive_all(messages, len as u64).await.unwrap();
            assert_eq!(h, header(&bytes), "{len} bytes in chunks of {chunk}");
            assert_eq!(got, bytes, "{len} bytes in chunks of {chunk}");
        }
    }
    // Empty data chunks anywhere after the header change nothing.
    for at in 1..=4 {
        let mut messages = valid_push();
        messages.insert(at, data_msg(&[]));
        assert_eq!(receive_all(messages, 1 << 20).await.unwrap().1, payload(), "empty chunk at {at}");
    }
}

#[tokio::test]
async fn every_mutation_of_a_valid_push_is_refused_with_its_code() {
    let n = valid_push().len();
    refused("an empty stream", vec![], Code::InvalidArgument, "starts with its header").await;
    for at in 0..n {
        let mut dropped = valid_push();
        let _ = dropped.remove(at);
        let (code, says) =
            if at == 0 { (Code::InvalidArgument, "starts with its header") } else { (Code::DataLoss, "of 17 bytes") };
        refused(&format!("message {at} dropped"), dropped, code, says).await;

        let mut repeated = valid_push();
        repeated.insert(at, copy(&repeated[at]));
        let (code, says) = if at == 0 {
            (Code::InvalidArgument, "a second header")
        } else {
            (Code::DataLoss, "more than the 17 bytes")
        };
        refused(&format!("message {at} repeated"), repeated, code, says).await;

        let mut emptied = valid_push();
        emptied.insert(at, Ok(WitnessVectorChunk { part: None }));
        let says = if at == 0 { "starts with its header" } else { "neither header nor data" };
        refused(&format!("a chunk without part at {at}"), emptied, Code::InvalidArgument, says).await;

        let mut broken = valid_push();
        broken.insert(at, Err(Status::cancelled("the WVG went away")));
        refused(&format!("a transport error at {at}"), broken, Code::Cancelled, "the WVG went away").await;
    }
    for to in 1..n {
        let mut moved = valid_push();
        let h = moved.remove(0);
        moved.insert(to, h);
        refused(&format!("the header moved to {to}"), moved, Code::InvalidArgument, "starts with its header").await;
    }
    let bytes = payload();
    for at in 0..bytes.len() {
        for bit in [0x01, 0x80] {
            let mut flipped = bytes.clone();
            flipped[at] ^= bit;
            let messages = vec![header_msg(header(&bytes)), data_msg(&flipped[..9]), data_msg(&flipped[9..])];
            refused(&format!("byte {at} flipped"), messages, Code::DataLoss, "does not match the header's").await;
        }
    }
    for (size, says) in [(0, "more than the 0 bytes"), (16, "more than the 16 bytes"), (18, "received 17 of 18 bytes")]
    {
        let mut messages = valid_push();
        messages[0] = header_msg(WitnessVectorHeader { size, ..header(&bytes) });
        refused(&format!("size {size}"), messages, Code::DataLoss, says).await;
    }
    for bit in 0..32 {
        let mut messages = valid_push();
        messages[0] = header_msg(WitnessVectorHeader { crc32: crc32fast::hash(&bytes) ^ (1 << bit), ..header(&bytes) });
        refused(&format!("CRC-32 bit {bit} flipped"), messages, Code::DataLoss, "does not match the header's").await;
    }
}

#[tokio::test]
async fn a_push_over_the_limit_is_refused_from_its_header() {
    // Whatever follows the header is never read: an error there would be the answer otherwise.
    for size in [17, 1 << 40, u64::MAX] {
        let h = WitnessVectorHeader { size, ..header(&payload()) };
        let messages = vec![header_msg(h), Err(Status::internal("read past a refused header"))];
        let e = receive_all(messages, 16).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("exceeds this prover's limit of 16 bytes"), "{e:?}");
    }
    // At the limit exactly, it is taken.
    assert_eq!(receive_all(valid_push(), 17).await.unwrap().1, payload());
}

/// `receive` checks the framing only; the prover then reads the job, protocol version and
/// geometry from the header, and each absent or out-of-range field is a fatal job error (a
/// header the WVG built wrong is not worth another attempt).
#[test]
fn a_header_without_job_version_or_geometry_is_a_fatal_job_error() {
    let empty = WitnessVectorHeader::default();
    let e = version_and_geometry(empty.protocol_version.as_ref(), empty.geometry.as_ref()).unwrap_err();
    assert!(!e.retryable && e.message.contains("without a protocol version"), "{e:?}");
    let version = v1::ProtocolVersion::from(ProtocolVersion::CURRENT);
    let e = version_and_geometry(Some(&version), None).unwrap_err();
    assert!(!e.retryable && e.message.contains("without a geometry"), "{e:?}");
    let e = circuit_key(&empty.job.unwrap_or_default()).unwrap_err();
    assert!(!e.retryable && e.message.contains("no basic circuit type 0"), "{e:?}");

    // Each field of a valid version and geometry pushed to the edges of its wire type.
    let small = v1::Geometry::from(Geometry::small());
    let edges = [0, 1, 2, 255, 256, 1024, 1025, 65_535, 65_536, u32::MAX];
    for field in 0..7 {
        for value in edges {
            let mut g = small;
            *[
                &mut g.state_tree_depth,
                &mut g.tx_chunk,
                &mut g.vm_chunk,
                &mut g.storage_chunk,
                &mut g.leaf_fan_in,
                &mut g.node_fan_in,
                &mut g.max_node_depth,
            ][field] = value;
            match version_and_geometry(Some(&version), Some(&g)) {
                // Accepted only within bounds, and read without truncation.
                Ok((_, geometry)) => {
                    assert!(geometry.validate().is_ok());
                    assert_eq!(v1::Geometry::from(geometry), g, "field {field} = {value}");
                }
                Err(e) => assert!(!e.retryable && e.message.starts_with("lease geometry"), "{e:?}"),
            }
        }
    }
    for (minor, patch) in [(65_536, 0), (0, 65_536), (u32::MAX, u32::MAX)] {
        let e = version_and_geometry(Some(&v1::ProtocolVersion { minor, patch }), Some(&small)).unwrap_err();
        assert!(!e.retryable && e.message.contains("without a protocol version"), "{e:?}");
    }

    // Rounds 0 to 5 name a circuit; 0 to 2 also need a basic type 1 to 3.
    for round in [0, 1, 2, 3, 4, 5, 6, 255, u32::MAX] {
        for circuit_id in [0, 1, 3, 4, 255, 256, 257, u32::MAX] {
            let job = v1::JobIdentity { aggregation_round: round, circuit_id, ..Default::default() };
            let basic_ok = (1..=3).contains(&circuit_id);
            match circuit_key(&job) {
                Ok(_) => {
                    assert!((3..=5).contains(&round) || round <= 2 && basic_ok, "round {round} circuit {circuit_id}")
                }
                Err(e) => {
                    assert!(!e.retryable, "{e:?}");
                    assert!(round > 5 || round <= 2 && !basic_ok, "round {round} circuit {circuit_id}: {e:?}");
                }
            }
        }
    }
}
