//! The circuit-input file: what witness generation writes for one circuit and witness vector
//! generation reads back (the "circuit" artifacts of zkSync Era's witness generator).
//!
//! Format v1, little-endian: magic `PMJI`, `u8` version (1), `u8` kind, then
//! - kind 0, basic: `u8` circuit id, digests (4 x `u64` each: tx hasher 1, main VM 2, storage
//!   application 2), `u32` transaction count and transactions (20 bytes each, as in the batch
//!   format), `u32` access count and accesses (key, old, new, `u8` sibling count, siblings);
//! - kind 1, aggregation: 3-byte key of the inner circuit ([`CircuitKey::to_bytes`]), `u32` count,
//!   then per proof `u32` length and plonky2's proof bytes;
//! - kind 2, recursion tip: `u32` count, then per basic type `u8` node depth, `u32` length, proof;
//! - kind 3, scheduler: `u32` batch number, `u16` minor, `u16` patch, `u32` length, tip proof.
//!
//! Proofs travel as bytes ([`EncodedInput`]); [`EncodedInput::decode`] turns them into a
//! [`JobInput`] with the inner circuits' common data from the setup store.

use plonky2::plonk::proof::ProofWithPublicInputs;
use proofmesh_core::batch::{Account, StorageAccess, Transaction};
use proofmesh_core::{BatchNumber, CircuitId, ProtocolVersion};

use crate::basic::{BasicCircuit, BasicInput};
use crate::prover::JobInput;
use crate::setup::{CircuitKey, SetupStore};
use crate::state::{digest_from_u64s, digest_to_u64s, Digest};
use crate::witness_vector::Proof;

const MAGIC: [u8; 4] = *b"PMJI";
const VERSION: u8 = 1;

/// A circuit input with its proofs still serialized: what witness generation produces without
/// loading any setup data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodedInput {
    /// Round 0.
    Basic(BasicInput),
    /// Rounds 1 and 2: proofs of `inner`, in chain order.
    Aggregation {
        /// The circuit that produced the proofs.
        inner: CircuitKey,
        /// plonky2 proof bytes.
        proofs: Vec<Vec<u8>>,
    },
    /// Round 3: per basic type (circuit-id order), the depth of its top node and that proof.
    Tip(Vec<(u8, Vec<u8>)>),
    /// Round 4.
    Scheduler {
        /// The recursion tip's proof bytes.
        tip: Vec<u8>,
        /// The batch.
        batch: BatchNumber,
        /// Its protocol version.
        version: ProtocolVersion,
    },
}

/// Why bytes are not a circuit input.
#[derive(Debug, thiserror::Error)]
pub enum JobInputError {
    /// Truncated or malformed at `offset`.
    #[error("circuit input format: {what} at byte {offset}")]
    Format {
        /// What was expected.
        what: String,
        /// Where.
        offset: usize,
    },
    /// A proof does not deserialize against the inner circuit's common data.
    #[error("circuit input: proof {index} is not a proof of {circuit}")]
    Proof {
        /// Its position.
        index: usize,
        /// The inner circuit's name.
        circuit: String,
    },
    /// Setup data needed to decode the proofs could not be obtained.
    #[error("circuit input: {0}")]
    Setup(String),
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], JobInputError> {
        let s = self.b.get(self.pos..self.pos.saturating_add(n)).ok_or_else(|| JobInputError::Format {
            what: format!("{what} ({n} bytes, {} left)", self.b.len() - self.pos),
            offset: self.pos,
        })?;
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, JobInputError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, JobInputError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self, what: &str) -> Result<u32, JobInputError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64, JobInputError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    /// A count whose items need at least `min_size` bytes each: refused before allocating if
    /// the bytes left cannot hold them.
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize, JobInputError> {
        let at = self.pos;
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_size) > self.b.len() - self.pos {
            return Err(JobInputError::Format { what: format!("{what} {n} exceeds the bytes left"), offset: at });
        }
        Ok(n)
    }
    fn digest(&mut self, what: &str) -> Result<Digest, JobInputError> {
        let at = self.pos;
        let mut v = [0u64; 4];
        for e in &mut v {
            *e = self.u64(what)?;
            if *e >= crate::batch::GOLDILOCKS_MODULUS {
                return Err(JobInputError::Format { what: format!("{what}: not a field element"), offset: at });
            }
        }
        Ok(digest_from_u64s(v))
    }
    fn blob(&mut self, what: &str) -> Result<Vec<u8>, JobInputError> {
        let n = self.count(what, 1)?;
        Ok(self.take(n, what)?.to_vec())
    }
    fn tx(&mut self) -> Result<Transaction, JobInputError> {
        Ok(Transaction { from: self.u32("tx.from")?, to: self.u32("tx.to")?, amount: self.u64("tx.amount")?, nonce: self.u32("tx.nonce")? })
    }
    fn account(&mut self) -> Result<Account, JobInputError> {
        Ok(Account { balance: self.u64("balance")?, nonce: self.u32("nonce")? })
    }
    fn access(&mut self) -> Result<StorageAccess, JobInputError> {
        let key = self.u32("access.key")?;
        let (old, new) = (self.account()?, self.account()?);
        let n = self.u8("sibling count")?;
        let siblings = (0..n).map(|_| self.digest("sibling").map(digest_to_u64s)).collect::<Result<_, _>>()?;
        Ok(StorageAccess { key, old, new, siblings })
    }
}

fn put_digest(out: &mut Vec<u8>, d: &Digest) {
    digest_to_u64s(*d).iter().for_each(|e| out.extend_from_slice(&e.to_le_bytes()));
}

fn put_blob(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_txs(out: &mut Vec<u8>, txs: &[Transaction]) {
    out.extend_from_slice(&(txs.len() as u32).to_le_bytes());
    for t in txs {
        out.extend_from_slice(&t.from.to_le_bytes());
        out.extend_from_slice(&t.to.to_le_bytes());
        out.extend_from_slice(&t.amount.to_le_bytes());
        out.extend_from_slice(&t.nonce.to_le_bytes());
    }
}

fn put_accesses(out: &mut Vec<u8>, accesses: &[StorageAccess]) {
    out.extend_from_slice(&(accesses.len() as u32).to_le_bytes());
    for a in accesses {
        out.extend_from_slice(&a.key.to_le_bytes());
        for acc in [a.old, a.new] {
            out.extend_from_slice(&acc.balance.to_le_bytes());
            out.extend_from_slice(&acc.nonce.to_le_bytes());
        }
        out.push(a.siblings.len() as u8);
        a.siblings.iter().flatten().for_each(|e| out.extend_from_slice(&e.to_le_bytes()));
    }
}

impl EncodedInput {
    /// Serializes in format v1.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.push(VERSION);
        match self {
            Self::Basic(input) => {
                out.push(0);
                out.push(input.circuit().id().0);
                match input {
                    BasicInput::TxHasher { tx_commitment, txs } => {
                        put_digest(&mut out, tx_commitment);
                        put_txs(&mut out, txs);
                        put_accesses(&mut out, &[]);
                    }
                    BasicInput::MainVm { tx_commitment, access_commitment, txs, accesses } => {
                        put_digest(&mut out, tx_commitment);
                        put_digest(&mut out, access_commitment);
                        put_txs(&mut out, txs);
                        put_accesses(&mut out, accesses);
                    }
                    BasicInput::StorageApplication { root, access_commitment, accesses } => {
                        put_digest(&mut out, root);
                        put_digest(&mut out, access_commitment);
                        put_txs(&mut out, &[]);
                        put_accesses(&mut out, accesses);
                    }
                }
            }
            Self::Aggregation { inner, proofs } => {
                out.push(1);
                out.extend_from_slice(&inner.to_bytes());
                out.extend_from_slice(&(proofs.len() as u32).to_le_bytes());
                proofs.iter().for_each(|p| put_blob(&mut out, p));
            }
            Self::Tip(per_type) => {
                out.push(2);
                out.extend_from_slice(&(per_type.len() as u32).to_le_bytes());
                for (depth, p) in per_type {
                    out.push(*depth);
                    put_blob(&mut out, p);
                }
            }
            Self::Scheduler { tip, batch, version } => {
                out.push(3);
                out.extend_from_slice(&batch.0.to_le_bytes());
                out.extend_from_slice(&version.minor.to_le_bytes());
                out.extend_from_slice(&version.patch.to_le_bytes());
                put_blob(&mut out, tip);
            }
        }
        out
    }

    /// Parses format v1. Errors: [`JobInputError::Format`] with the offset of the first problem.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, JobInputError> {
        let mut r = Reader { b: bytes, pos: 0 };
        if r.take(4, "magic")? != MAGIC {
            return Err(JobInputError::Format { what: "magic PMJI".into(), offset: 0 });
        }
        let v = r.u8("version")?;
        if v != VERSION {
            return Err(JobInputError::Format { what: format!("version 1, found {v}"), offset: 4 });
        }
        let input = match r.u8("kind")? {
            0 => {
                let at = r.pos;
                let circuit = BasicCircuit::from_id(CircuitId(r.u8("circuit id")?))
                    .ok_or(JobInputError::Format { what: "a basic circuit id".into(), offset: at })?;
                let first = r.digest("commitment")?;
                let second = if circuit == BasicCircuit::TxHasher { None } else { Some(r.digest("commitment")?) };
                let n = r.count("tx count", 20)?;
                let txs = (0..n).map(|_| r.tx()).collect::<Result<Vec<_>, _>>()?;
                let n = r.count("access count", 29)?;
                let accesses = (0..n).map(|_| r.access()).collect::<Result<Vec<_>, _>>()?;
                Self::Basic(match (circuit, second) {
                    (BasicCircuit::TxHasher, _) => BasicInput::TxHasher { tx_commitment: first, txs },
                    (BasicCircuit::MainVm, Some(a)) => {
                        BasicInput::MainVm { tx_commitment: first, access_commitment: a, txs, accesses }
                    }
                    (_, a) => BasicInput::StorageApplication {
                        root: first,
                        access_commitment: a.expect("read for non-tx-hasher"),
                        accesses,
                    },
                })
            }
            1 => {
                let at = r.pos;
                let key: [u8; 3] = r.take(3, "inner circuit")?.try_into().expect("3 bytes");
                let inner = CircuitKey::from_bytes(key)
                    .ok_or(JobInputError::Format { what: "an inner circuit key".into(), offset: at })?;
                let n = r.count("proof count", 4)?;
                let proofs = (0..n).map(|_| r.blob("proof")).collect::<Result<_, _>>()?;
                Self::Aggregation { inner, proofs }
            }
            2 => {
                let n = r.count("type count", 5)?;
                let per_type = (0..n).map(|_| Ok((r.u8("depth")?, r.blob("proof")?))).collect::<Result<_, _>>()?;
                Self::Tip(per_type)
            }
            3 => {
                let batch = BatchNumber(r.u32("batch number")?);
                let version = ProtocolVersion { minor: r.u16("minor")?, patch: r.u16("patch")? };
                Self::Scheduler { tip: r.blob("tip proof")?, batch, version }
            }
            k => return Err(JobInputError::Format { what: format!("kind 0..=3, found {k}"), offset: 5 }),
        };
        if r.pos != bytes.len() {
            return Err(JobInputError::Format { what: "end of input".into(), offset: r.pos });
        }
        Ok(input)
    }

    /// The job input, with every proof deserialized against its circuit's common data from
    /// `store` (verifier data only; no prover data is loaded).
    pub fn decode(self, store: &SetupStore) -> Result<JobInput, JobInputError> {
        let proof = |bytes: Vec<u8>, key: CircuitKey, index: usize| -> Result<Proof, JobInputError> {
            let vd = store.verifier(key).map_err(|e| JobInputError::Setup(format!("{e:#}")))?;
            ProofWithPublicInputs::from_bytes(bytes, &vd.common)
                .map_err(|_| JobInputError::Proof { index, circuit: key.name() })
        };
        Ok(match self {
            Self::Basic(b) => JobInput::Basic(b),
            Self::Aggregation { inner, proofs } => JobInput::Aggregation(
                proofs.into_iter().enumerate().map(|(i, p)| proof(p, inner, i)).collect::<Result<_, _>>()?,
            ),
            Self::Tip(per_type) => JobInput::Tip(
                per_type
                    .into_iter()
                    .zip(BasicCircuit::ALL)
                    .enumerate()
                    .map(|(i, ((d, p), t))| Ok((usize::from(d), proof(p, CircuitKey::Node(t, d), i)?)))
                    .collect::<Result<_, JobInputError>>()?,
            ),
            Self::Scheduler { tip, batch, version } => {
                JobInput::Scheduler { tip: proof(tip, CircuitKey::RecursionTip, 0)?, batch, version }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::basic::chunk_inputs;
    use crate::sample::generate_batches;
    use crate::state::replay;

    #[test]
    fn basic_inputs_round_trip_and_truncations_are_errors() {
        let batch = generate_batches(3, 16, &[9], 1).unwrap().remove(0);
        let replay = replay(&batch).unwrap();
        let g = proofmesh_core::Geometry::small();
        for t in BasicCircuit::ALL {
            for input in chunk_inputs(&batch, &replay, &g, t) {
                let e = EncodedInput::Basic(input);
                let bytes = e.to_bytes();
                assert_eq!(EncodedInput::from_bytes(&bytes).unwrap(), e);
                for len in (0..bytes.len()).step_by(7) {
                    assert!(EncodedInput::from_bytes(&bytes[..len]).is_err());
                }
            }
        }
    }

    #[test]
    fn proof_lists_round_trip() {
        let inputs = [
            EncodedInput::Aggregation { inner: CircuitKey::Node(BasicCircuit::MainVm, 1), proofs: vec![vec![1, 2], vec![]] },
            EncodedInput::Tip(vec![(0, vec![9; 5]), (2, vec![7])]),
            EncodedInput::Scheduler { tip: vec![3; 10], batch: BatchNumber(42), version: ProtocolVersion::CURRENT },
        ];
        for e in inputs {
            assert_eq!(EncodedInput::from_bytes(&e.to_bytes()).unwrap(), e);
        }
        let mut huge = EncodedInput::Tip(vec![]).to_bytes();
        huge[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(EncodedInput::from_bytes(&huge), Err(JobInputError::Format { offset: 6, .. })));
    }
}
