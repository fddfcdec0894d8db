//! The batch file format (v1), defined in `proofmesh-core` so that the gateway can parse batches
//! without the proof system; re-exported here under its old path.

pub use proofmesh_core::batch::*;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::generate_batches;

    fn sample() -> Vec<u8> {
        generate_batches(7, 16, &[3], 1).unwrap().remove(0).to_bytes()
    }

    #[test]
    fn round_trips() {
        let bytes = sample();
        let b = Batch::from_bytes(&bytes).unwrap();
        assert_eq!(b.to_bytes(), bytes);
        assert_eq!(b.transactions.len(), 3);
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let bytes = sample();
        for len in 0..bytes.len() {
            let e = Batch::from_bytes(&bytes[..len]).unwrap_err();
            assert!(e.offset <= len, "{e}");
        }
    }

    #[test]
    fn bad_fields_are_named_with_their_offset() {
        let mut bytes = sample();
        bytes[0] = b'X';
        let e = Batch::from_bytes(&bytes).unwrap_err();
        assert_eq!((e.field.as_str(), e.offset), ("magic", 0));

        let mut bytes = sample();
        bytes[4] = 9;
        assert_eq!(Batch::from_bytes(&bytes).unwrap_err().field, "format_version");

        // prev_state_root[0] at offset 16: set it to the modulus.
        let mut bytes = sample();
        bytes[16..24].copy_from_slice(&GOLDILOCKS_MODULUS.to_le_bytes());
        let e = Batch::from_bytes(&bytes).unwrap_err();
        assert_eq!((e.field.as_str(), e.offset), ("prev_state_root[0]", 16));

        // transactions[0].amount at 52 + 4 + 4.
        let mut bytes = sample();
        bytes[60..68].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = Batch::from_bytes(&bytes).unwrap_err();
        assert_eq!((e.field.as_str(), e.offset), ("transactions[0].amount", 60));

        let mut bytes = sample();
        bytes.push(0);
        assert_eq!(Batch::from_bytes(&bytes).unwrap_err().field, "end");

        // A huge tx_count is refused before allocating.
        let mut bytes = sample();
        bytes[48..52].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = Batch::from_bytes(&bytes).unwrap_err();
        assert_eq!((e.field.as_str(), e.offset), ("tx_count", 48));
    }

    #[test]
    fn garbage_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let good = sample();
        for _ in 0..2000 {
            let mut bytes = good.clone();
            for _ in 0..rng.gen_range(1..8) {
                let i = rng.gen_range(0..bytes.len());
                bytes[i] = rng.gen();
            }
            let _ = Batch::from_bytes(&bytes);
        }
    }
}
