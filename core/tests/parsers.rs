//! The batch parser under attack (property-based, proptest): arbitrary bytes and mutations of a
//! real sample batch (bytes flipped, truncated, extended) never panic; every failure is a typed
//! `BatchFormatError` naming a field and an offset within the input; a valid batch round-trips.

use proofmesh_core::batch::Batch;
use proptest::collection::vec;
use proptest::prelude::*;

fn sample() -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../samples/batch_000001.bin");
    std::fs::read(path).expect("samples/batch_000001.bin")
}

/// `bytes` with each `(position, value)` written (positions taken modulo the length), then cut to
/// `keep` bytes (modulo length + 1), then `tail` appended.
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_are_a_typed_error_never_a_panic(bytes in vec(any::<u8>(), 0..4096)) {
        if let Err(e) = Batch::from_bytes(&bytes) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn a_mutated_sample_is_parsed_or_refused_never_a_panic(
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
}

#[test]
fn the_sample_round_trips() {
    let bytes = sample();
    let batch = Batch::from_bytes(&bytes).unwrap();
    assert_eq!(batch.to_bytes(), bytes);
}
