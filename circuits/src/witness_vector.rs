//! Witness vectors: the full assignment of a circuit's wires, synthesized by witness vector
//! generation (WVG) and proven elsewhere, possibly in another process on another machine.
//!
//! `synthesize` runs plonky2's witness generators (`generate_partial_witness`); `prove` rebuilds the
//! partition witness from the bytes alone and runs `prove_with_partition_witness`. The same witness
//! vector proves to the same proof bytes wherever it is proven.
//!
//! Wire format, version 1, little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `PMWV` |
//! | 2 | format version (1) |
//! | 3 | circuit key: stage (round 0..=4, 5 = compression), circuit id, node depth |
//! | 1 | reserved (0) |
//! | 32 | circuit digest (4 x u64): the circuit this assignment is for |
//! | 8 | `n`: number of partition slots (the circuit's representative map length) |
//! | ceil(n / 8) | presence bitmap, bit `i` (LSB first) set if slot `i` has a value |
//! | 8 x popcount | the present values, canonical Goldilocks elements (u64) |

use plonky2::field::types::{Field, PrimeField64};
use plonky2::iop::generator::generate_partial_witness;
use plonky2::iop::witness::{PartialWitness, PartitionWitness};
use plonky2::plonk::proof::ProofWithPublicInputs;
use plonky2::plonk::prover::prove_with_partition_witness;
use plonky2::util::timing::TimingTree;

use crate::batch::GOLDILOCKS_MODULUS;
use crate::setup::{Circuit, CircuitKey};
use crate::state::{digest_to_u64s, Digest};
use crate::{C, D, F};

const MAGIC: [u8; 4] = *b"PMWV";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 4 + 2 + 3 + 1 + 32 + 8;

/// A proof of any circuit of the tree.
pub type Proof = ProofWithPublicInputs<F, C, D>;

/// The full wire assignment of one circuit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessVector {
    /// The circuit it is for.
    pub key: CircuitKey,
    /// That circuit's digest (4 canonical u64s): a prover refuses a vector for another circuit.
    pub circuit_digest: [u64; 4],
    /// One entry per partition slot (`None`: not assigned).
    pub values: Vec<Option<F>>,
}

/// Why bytes are not a witness vector, or not one for this circuit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WitnessVectorError {
    /// The bytes are malformed.
    #[error("witness vector: {field} at byte {offset}: {problem}")]
    Format {
        /// The field.
        field: &'static str,
        /// Its byte offset.
        offset: usize,
        /// What is wrong.
        problem: String,
    },
    /// A well-formed vector for a different circuit.
    #[error("witness vector is for {found} (digest {found_digest:x?}), not for {expected}")]
    WrongCircuit {
        /// The circuit it names.
        found: String,
        /// Its digest.
        found_digest: [u64; 4],
        /// The circuit it was given to.
        expected: String,
    },
}

fn format_err(field: &'static str, offset: usize, problem: impl Into<String>) -> WitnessVectorError {
    WitnessVectorError::Format { field, offset, problem: problem.into() }
}

impl WitnessVector {
    /// Serializes to the wire format above.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.values.len();
        let present = self.values.iter().filter(|v| v.is_some()).count();
        let mut out = Vec::with_capacity(HEADER_LEN + n.div_ceil(8) + 8 * present);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.key.to_bytes());
        out.push(0);
        self.circuit_digest.iter().for_each(|e| out.extend_from_slice(&e.to_le_bytes()));
        out.extend_from_slice(&(n as u64).to_le_bytes());
        let mut bitmap = vec![0u8; n.div_ceil(8)];
        for (i, v) in self.values.iter().enumerate() {
            if v.is_some() {
                bitmap[i / 8] |= 1 << (i % 8);
            }
        }
        out.extend_from_slice(&bitmap);
        for v in self.values.iter().flatten() {
            out.extend_from_slice(&v.to_canonical_u64().to_le_bytes());
        }
        out
    }

    /// Parses the wire format, checking every length and value.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WitnessVectorError> {
        if bytes.len() < HEADER_LEN {
            return Err(format_err("header", bytes.len(), format!("truncated: {} of {HEADER_LEN} bytes", bytes.len())));
        }
        if bytes[0..4] != MAGIC {
            return Err(format_err("magic", 0, "expected \"PMWV\""));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(format_err("format_version", 4, format!("unsupported version {version}")));
        }
        let key = CircuitKey::from_bytes([bytes[6], bytes[7], bytes[8]])
            .ok_or_else(|| format_err("circuit_key", 6, format!("{:?} names no circuit", &bytes[6..9])))?;
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        let circuit_digest = [u64_at(10), u64_at(18), u64_at(26), u64_at(34)];
        let n = u64_at(42);
        let bitmap_len = n.div_ceil(8);
        let rest = (bytes.len() - HEADER_LEN) as u64;
        if bitmap_len > rest {
            return Err(format_err("length", 42, format!("{n} slots need a {bitmap_len}-byte bitmap, {rest} bytes left")));
        }
        let n = n as usize;
        let bitmap = &bytes[HEADER_LEN..HEADER_LEN + bitmap_len as usize];
        let present = bitmap.iter().map(|b| b.count_ones() as usize).sum::<usize>();
        let values_at = HEADER_LEN + bitmap.len();
        if bytes.len() - values_at != 8 * present {
            return Err(format_err(
                "values",
                values_at,
                format!("the bitmap marks {present} values ({} bytes), {} bytes follow", 8 * present, bytes.len() - values_at),
            ));
        }
        let mut values = Vec::with_capacity(n);
        let mut next = values_at;
        for i in 0..n {
            if bitmap[i / 8] & (1 << (i % 8)) == 0 {
                values.push(None);
                continue;
            }
            let v = u64_at(next);
            if v >= GOLDILOCKS_MODULUS {
                return Err(format_err("values", next, format!("{v} is not a canonical field element")));
            }
            values.push(Some(F::from_canonical_u64(v)));
            next += 8;
        }
        if bitmap.last().is_some_and(|b| !n.is_multiple_of(8) && b >> (n % 8) != 0) {
            return Err(format_err("bitmap", values_at - 1, "bits set past the last slot"));
        }
        Ok(WitnessVector { key, circuit_digest, values })
    }

    fn check_circuit(&self, circuit: &Circuit) -> Result<(), WitnessVectorError> {
        let digest = digest_to_u64s(circuit_digest(circuit));
        if self.key != circuit.key || self.circuit_digest != digest {
            return Err(WitnessVectorError::WrongCircuit {
                found: self.key.name(),
                found_digest: self.circuit_digest,
                expected: circuit.key.name(),
            });
        }
        let slots = circuit.data.prover_only.representative_map.len();
        if self.values.len() != slots {
            return Err(format_err("length", 42, format!("{} slots, the circuit has {slots}", self.values.len())));
        }
        Ok(())
    }
}

/// Runs `f`, turning a panic into its message. plonky2 panics on some malformed inputs (witness
/// contradictions, malformed proofs) where it could return an error; a caller handling untrusted
/// input must not crash for it.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into())
    })
}

fn circuit_digest(circuit: &Circuit) -> Digest {
    circuit.data.verifier_only.circuit_digest
}

/// Witness vector generation: runs the circuit's witness generators over `inputs`.
///
/// Errors if the inputs contradict the circuit (two generators set a wire to different values).
pub fn synthesize(circuit: &Circuit, inputs: PartialWitness<F>) -> anyhow::Result<WitnessVector> {
    // plonky2's generators assert on some contradictions (a value too large for its limbs)
    // instead of returning an error: both are a failed job here, never a crashed worker.
    let pw = catch_panic(|| generate_partial_witness(inputs, &circuit.data.prover_only, &circuit.data.common))
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|e| anyhow::anyhow!("{}: witness generation failed: {e}", circuit.key.name()))?;
    Ok(WitnessVector {
        key: circuit.key,
        circuit_digest: digest_to_u64s(circuit_digest(circuit)),
        values: pw.values,
    })
}

/// Proves `circuit` from a witness vector, then verifies the proof natively (milliseconds), so
/// an assignment that does not satisfy the circuit is an error here, never a bad proof handed on.
pub fn prove(circuit: &Circuit, wv: WitnessVector) -> anyhow::Result<Proof> {
    wv.check_circuit(circuit)?;
    let data = &circuit.data;
    let mut pw = PartitionWitness::new(data.common.config.num_wires, data.common.degree(), &data.prover_only.representative_map);
    pw.values = wv.values;
    let proof = prove_with_partition_witness(&data.prover_only, &data.common, pw, &mut TimingTree::default())
        .map_err(|e| anyhow::anyhow!("{}: proving failed: {e}", circuit.key.name()))?;
    data.verify(proof.clone())
        .map_err(|e| anyhow::anyhow!("{}: the witness does not satisfy the circuit: {e}", circuit.key.name()))?;
    Ok(proof)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector() -> WitnessVector {
        WitnessVector {
            key: CircuitKey::Node(crate::basic::BasicCircuit::MainVm, 1),
            circuit_digest: [1, 2, 3, 4],
            values: (0..21u64).map(|i| (i % 3 != 0).then(|| F::from_canonical_u64(i * 1000))).collect(),
        }
    }

    #[test]
    fn round_trips() {
        let wv = vector();
        assert_eq!(WitnessVector::from_bytes(&wv.to_bytes()).unwrap(), wv);
    }

    #[test]
    fn truncated_or_garbled_bytes_are_typed_errors() {
        let bytes = vector().to_bytes();
        for len in 0..bytes.len() {
            assert!(WitnessVector::from_bytes(&bytes[..len]).is_err(), "prefix of {len} bytes accepted");
        }
        let mut bad = bytes.clone();
        let last = bad.len() - 8;
        bad[last..].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(WitnessVector::from_bytes(&bad), Err(WitnessVectorError::Format { field: "values", .. })));
        let mut bad = bytes.clone();
        bad[42..50].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(WitnessVector::from_bytes(&bad), Err(WitnessVectorError::Format { field: "length", .. })));
    }
}
