//! Parsers under attack (property-based, proptest): the batch format (what the gateway accepts
//! from the L2 node), witness vectors (header and body, as a prover receives them), circuit
//! inputs (as witness generation writes them and WVGs read them) and the final proof file's
//! header (what `verify` reads before it loads any setup data). Arbitrary bytes and mutations of
//! valid encodings (bytes overwritten, truncated, extended) never panic: every failure is the
//! parser's typed error; valid values round-trip.
//!
//! The final proof's body (plonky2's compressed proof) parses only against the compression
//! circuit's verifier data, minutes to build; `tests/proof_tree.rs` flips bytes of a real final
//! proof against it.

use proofmesh_circuits::basic::BasicCircuit;
use proofmesh_circuits::final_proof::{parse_header, verify, VerifyError, HEADER_LEN};
use proofmesh_circuits::job_input::EncodedInput;
use proofmesh_circuits::setup::CircuitKey;
use proofmesh_circuits::witness_vector::WitnessVector;
use proofmesh_circuits::{Field, F};
use proofmesh_core::batch::Batch;
use proofmesh_core::{BatchNumber, CircuitId, Geometry, ProtocolVersion};
use proptest::collection::vec;
use proptest::prelude::*;

/// `bytes` with each `(position, value)` written (positions modulo the length), cut to `keep`
/// bytes (modulo length + 1), then `tail` appended.
fn mutate(mut bytes: Vec<u8>, flips: &[(usize, u8)], keep: usize, tail: &[u8]) -> Vec<u8> {
    if !bytes.is_empty() {
        for &(at, v) in flips {
            let n = bytes.len();
            bytes[at % n] = v;
        }
    }
    bytes.truncate(keep % (bytes.len() + 1));
    bytes.extend_from_slice(tail);
    bytes
}

fn witness_vector(values: Vec<Option<u64>>, digest: [u64; 4], id: u8) -> WitnessVector {
    let basic = BasicCircuit::from_id(CircuitId(1 + id % 3)).expect("types 1..=3");
    WitnessVector {
        key: CircuitKey::Basic(basic),
        circuit_digest: digest,
        values: values.into_iter().map(|v| v.map(F::from_canonical_u64)).collect(),
    }
}

fn sample() -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../samples/batch_000001.bin");
    std::fs::read(path).expect("samples/batch_000001.bin")
}

fn goldilocks() -> impl Strategy<Value = u64> {
    0..0xffff_ffff_0000_0001u64
}

/// A final proof file's header as `final_proof.rs` documents it, written here byte by byte
/// (not with the crate's encoder, so that the test checks the documented layout).
fn final_proof_header(version: ProtocolVersion, g: &Geometry) -> Vec<u8> {
    let mut out = b"PMFP".to_vec();
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&version.minor.to_le_bytes());
    out.extend_from_slice(&version.patch.to_le_bytes());
    out.push(g.state_tree_depth);
    for c in [g.tx_chunk, g.vm_chunk, g.storage_chunk] {
        out.extend_from_slice(&c.to_le_bytes());
    }
    out.extend_from_slice(&[g.leaf_fan_in, g.node_fan_in, g.max_node_depth]);
    out
}

/// Geometries within `Geometry::validate`'s bounds.
fn valid_geometry() -> impl Strategy<Value = Geometry> {
    (4u8..=32, 1u16..=1024, 1u16..=256, 1u16..=256, 1u8..=8, 2u8..=8, 1u8..=6).prop_map(
        |(state_tree_depth, tx_chunk, vm_chunk, storage_chunk, leaf_fan_in, node_fan_in, max_node_depth)| Geometry {
            state_tree_depth,
            tx_chunk,
            vm_chunk,
            storage_chunk,
            leaf_fan_in,
            node_fan_in,
            max_node_depth,
        },
    )
}

fn protocol_version() -> impl Strategy<Value = ProtocolVersion> {
    (any::<u16>(), any::<u16>()).prop_map(|(minor, patch)| ProtocolVersion { minor, patch })
}

/// Which check of the header `bytes` fails first, by the documented layout: the words each
/// [`VerifyError::Format`] message of `parse_header` starts with; `None` for a valid header.
fn expected_header_error(bytes: &[u8]) -> Option<&'static str> {
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    if bytes.len() < HEADER_LEN {
        return Some("truncated header");
    }
    if &bytes[..4] != b"PMFP" {
        return Some("magic at byte 0");
    }
    if u16_at(4) != 1 {
        return Some("format version at byte 4");
    }
    let g = Geometry {
        state_tree_depth: bytes[10],
        tx_chunk: u16_at(11),
        vm_chunk: u16_at(13),
        storage_chunk: u16_at(15),
        leaf_fan_in: bytes[17],
        node_fan_in: bytes[18],
        max_node_depth: bytes[19],
    };
    g.validate().err().map(|_| "geometry at byte 10")
}

/// `parse_header`'s result, checked against [`expected_header_error`]: an `Ok` is exactly the
/// header's fields, an `Err` is `VerifyError::Format` for the first field that is wrong.
fn check_header(bytes: &[u8]) -> Result<(), TestCaseError> {
    match (parse_header(bytes), expected_header_error(bytes)) {
        (Ok((version, geometry)), None) => {
            prop_assert_eq!(&final_proof_header(version, &geometry)[..], &bytes[..HEADER_LEN]);
        }
        (Err(VerifyError::Format(reason)), Some(expected)) => {
            prop_assert!(reason.starts_with(expected), "{:?} is not {:?}", reason, expected);
        }
        (got, expected) => prop_assert!(false, "parse_header gave {:?}, expected {:?}", got, expected),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_are_not_a_batch_and_never_a_panic(bytes in vec(any::<u8>(), 0..4096)) {
        if let Err(e) = Batch::from_bytes(&bytes) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn a_mutated_sample_batch_is_parsed_or_refused_never_a_panic(
        flips in vec((any::<usize>(), any::<u8>()), 0..16),
        keep in any::<usize>(),
        tail in vec(any::<u8>(), 0..16),
    ) {
        let bytes = mutate(sample(), &flips, keep, &tail);
        match Batch::from_bytes(&bytes) {
            // A mutation the format cannot see (e.g. a transaction's value) still re-encodes.
            Ok(b) => prop_assert_eq!(Batch::from_bytes(&b.to_bytes()).unwrap(), b),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn witness_vectors_round_trip(values in vec(proptest::option::of(goldilocks()), 0..200), digest in any::<[u64; 4]>(), id in any::<u8>()) {
        let wv = witness_vector(values, digest, id);
        prop_assert_eq!(WitnessVector::from_bytes(&wv.to_bytes()).unwrap(), wv);
    }

    #[test]
    fn arbitrary_bytes_are_not_a_witness_vector_and_never_a_panic(bytes in vec(any::<u8>(), 0..2048)) {
        if let Err(e) = WitnessVector::from_bytes(&bytes) {
            prop_assert!(e.to_string().starts_with("witness vector"));
        }
    }

    #[test]
    fn a_mutated_witness_vector_is_parsed_or_refused_never_a_panic(
        values in vec(proptest::option::of(goldilocks()), 0..100),
        flips in vec((any::<usize>(), any::<u8>()), 0..8),
        keep in any::<usize>(),
        tail in vec(any::<u8>(), 0..24),
    ) {
        let bytes = mutate(witness_vector(values, [1, 2, 3, 4], 0).to_bytes(), &flips, keep, &tail);
        if let Ok(wv) = WitnessVector::from_bytes(&bytes) {
            // Whatever it accepted is a well-formed vector: it encodes to the same bytes.
            prop_assert_eq!(wv.to_bytes(), bytes);
        }
    }

    #[test]
    fn circuit_inputs_round_trip_and_mutations_never_panic(
        tip in vec(any::<u8>(), 0..300),
        proofs in vec(vec(any::<u8>(), 0..100), 0..4),
        batch in any::<u32>(),
        flips in vec((any::<usize>(), any::<u8>()), 0..8),
        keep in any::<usize>(),
    ) {
        let version = ProtocolVersion { minor: 1, patch: 0 };
        let inner = CircuitKey::Basic(BasicCircuit::from_id(CircuitId(2)).unwrap());
        for input in [
            EncodedInput::Scheduler { tip: tip.clone(), batch: BatchNumber(batch), version },
            EncodedInput::Aggregation { inner, proofs: proofs.clone() },
        ] {
            let bytes = input.to_bytes();
            prop_assert_eq!(EncodedInput::from_bytes(&bytes).unwrap(), input);
            if let Err(e) = EncodedInput::from_bytes(&mutate(bytes, &flips, keep, &[])) {
                prop_assert!(e.to_string().starts_with("circuit input"));
            }
        }
    }

    #[test]
    fn arbitrary_bytes_are_not_a_circuit_input_and_never_a_panic(bytes in vec(any::<u8>(), 0..2048)) {
        if let Err(e) = EncodedInput::from_bytes(&bytes) {
            prop_assert!(e.to_string().starts_with("circuit input"));
        }
    }

    #[test]
    fn final_proof_headers_round_trip(
        version in protocol_version(),
        geometry in valid_geometry(),
        body in vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = final_proof_header(version, &geometry);
        prop_assert_eq!(bytes.len(), HEADER_LEN);
        bytes.extend_from_slice(&body);
        let (v, g) = parse_header(&bytes).unwrap();
        prop_assert_eq!(v, version);
        prop_assert_eq!(g, geometry);
    }

    /// Arbitrary bytes, often behind the magic (and format version) so the later checks are
    /// reached too.
    #[test]
    fn arbitrary_bytes_are_not_a_final_proof_header_and_never_a_panic(
        prefix in prop_oneof![Just(&b""[..]), Just(&b"PMFP"[..]), Just(&b"PMFP\x01\x00"[..])],
        rest in vec(any::<u8>(), 0..64),
    ) {
        check_header(&[prefix, &rest[..]].concat())?;
    }

    #[test]
    fn a_mutated_final_proof_header_is_parsed_or_refused_never_a_panic(
        version in protocol_version(),
        geometry in valid_geometry(),
        body in vec(any::<u8>(), 0..64),
        flips in vec((0..HEADER_LEN, any::<u8>()), 0..4),
        cut in proptest::option::of(any::<usize>()),
        tail in vec(any::<u8>(), 0..8),
    ) {
        let mut bytes = final_proof_header(version, &geometry);
        bytes.extend_from_slice(&body);
        let keep = cut.unwrap_or(bytes.len());
        check_header(&mutate(bytes, &flips, keep, &tail))?;
    }

    /// `verify` reads the header first: a malformed one is refused with `parse_header`'s error
    /// whatever the batch; a well-formed one is then checked against the batch (here an empty
    /// file, or the sample batch of another protocol version), still before any setup data is
    /// loaded or built (the setup directory stays empty).
    #[test]
    fn verify_refuses_a_malformed_proof_file_before_loading_setup_data(
        version in protocol_version(),
        geometry in valid_geometry(),
        body in vec(any::<u8>(), 0..64),
        flips in vec((0..HEADER_LEN, any::<u8>()), 0..3),
        cut in proptest::option::of(any::<usize>()),
        with_sample in any::<bool>(),
    ) {
        let sample = sample();
        let batch = if with_sample { &sample[..] } else { &[][..] };
        let mut bytes = final_proof_header(version, &geometry);
        bytes.extend_from_slice(&body);
        let keep = cut.unwrap_or(bytes.len());
        let bytes = mutate(bytes, &flips, keep, &[]);
        // Never a proof file of the sample's own version (0.1.0) with the sample: that goes on to
        // replay the batch and build setup data (minutes).
        if with_sample {
            prop_assume!(parse_header(&bytes).map_or(true, |(v, _)| v != ProtocolVersion::CURRENT));
        }
        let dir = tempfile::tempdir().unwrap();
        let got = verify(&bytes, batch, dir.path());
        match (parse_header(&bytes), got) {
            (Err(VerifyError::Format(header)), Err(VerifyError::Format(verified))) => prop_assert_eq!(header, verified),
            (Ok(_), Err(VerifyError::Batch(_))) if !with_sample => {}
            (Ok((v, _)), Err(VerifyError::Format(reason))) if with_sample => {
                prop_assert!(v != ProtocolVersion::CURRENT);
                prop_assert!(reason.starts_with("proof is for protocol version"), "{}", reason);
            }
            (header, got) => prop_assert!(false, "header {:?}, verify {:?}", header, got),
        }
        prop_assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

#[test]
fn the_sample_batch_round_trips() {
    let bytes = sample();
    let batch = Batch::from_bytes(&bytes).unwrap();
    assert_eq!(batch.to_bytes(), bytes);
}
