//! Parsers under attack (property-based, proptest): the batch format (what the gateway accepts
//! from the L2 node), witness vectors (header and body, as a prover receives them) and circuit
//! inputs (as witness generation writes them and WVGs read them). Arbitrary bytes and mutations of
//! valid encodings (bytes overwritten, truncated, extended) never panic: every failure is the
//! parser's typed error; valid values round-trip.

use proofmesh_circuits::basic::BasicCircuit;
use proofmesh_circuits::job_input::EncodedInput;
use proofmesh_circuits::setup::CircuitKey;
use proofmesh_circuits::witness_vector::WitnessVector;
use proofmesh_circuits::{Field, F};
use proofmesh_core::batch::Batch;
use proofmesh_core::{BatchNumber, CircuitId, ProtocolVersion};
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
}

#[test]
fn the_sample_batch_round_trips() {
    let bytes = sample();
    let batch = Batch::from_bytes(&bytes).unwrap();
    assert_eq!(batch.to_bytes(), bytes);
}
