//! The final proof file and its verifier: the proof checks from its bytes and the batch file alone.
//!
//! File format, version 1, little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `PMFP` |
//! | 2 | format version (1) |
//! | 2 + 2 | protocol version minor, patch |
//! | 1 | geometry: state tree depth |
//! | 2 + 2 + 2 | geometry: tx, VM and storage chunk sizes |
//! | 1 + 1 + 1 | geometry: leaf fan-in, node fan-in, max node depth |
//! | rest | the compression proof, plonky2's compressed form (`CompressedProofWithPublicInputs::to_bytes`) |
//!
//! The verifier rebuilds (or loads from its cache) the compression circuit's verifier data for
//! the header's protocol version and geometry (the geometry is bounds-checked first), recomputes
//! the 18 public inputs by replaying the batch file, and accepts only if the proof's public inputs
//! are exactly those and the proof verifies.

use std::path::Path;

use plonky2::plonk::proof::CompressedProofWithPublicInputs;
use proofmesh_core::{Geometry, ProtocolVersion};

use crate::batch::Batch;
use crate::setup::{CircuitKey, SetupStore};
use crate::state::{replay, PublicData};
use crate::witness_vector::{catch_panic, Proof};
use crate::{C, D, F};

const MAGIC: [u8; 4] = *b"PMFP";
const VERSION: u16 = 1;
/// Bytes before the compression proof in a final proof file (the table above, all but "rest").
pub const HEADER_LEN: usize = 4 + 2 + 4 + 1 + 6 + 3;

/// A final (compressed) proof with what is needed to check it.
#[derive(Debug, Clone)]
pub struct FinalProof {
    /// The protocol version it was proven under.
    pub protocol_version: ProtocolVersion,
    /// The geometry of its circuits.
    pub geometry: Geometry,
    /// The compression proof in compressed form.
    pub proof: CompressedProofWithPublicInputs<F, C, D>,
    /// Size of the same proof uncompressed, bytes (for reports).
    pub uncompressed_bytes: usize,
}

/// Why a final proof was refused.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The proof file is malformed.
    #[error("proof file: {0}")]
    Format(String),
    /// The batch file is malformed.
    #[error(transparent)]
    Batch(#[from] crate::batch::BatchFormatError),
    /// The batch does not execute.
    #[error("batch does not replay: {0}")]
    Replay(#[from] crate::state::ReplayError),
    /// The proof is for other public data (another batch, or other contents).
    #[error("the proof's public inputs are not this batch's (proof is for batch {proof_batch}, the file is batch {batch})")]
    WrongBatch {
        /// Batch number in the proof's public inputs.
        proof_batch: u64,
        /// Batch number of the batch file.
        batch: u32,
    },
    /// The proof does not verify.
    #[error("invalid proof: {0}")]
    Invalid(String),
    /// The verifier data could not be built or loaded.
    #[error("setup: {0}")]
    Setup(String),
}

impl FinalProof {
    /// Wraps a compression proof of `store`'s circuits.
    pub fn new(store: &SetupStore, protocol_version: ProtocolVersion, proof: Proof) -> anyhow::Result<Self> {
        let vd = store.verifier(CircuitKey::Compression)?;
        let uncompressed_bytes = proof.to_bytes().len();
        let proof = proof.compress(&vd.verifier_only.circuit_digest, &vd.common)?;
        Ok(FinalProof { protocol_version, geometry: *store.geometry(), proof, uncompressed_bytes })
    }

    /// The 18 public inputs the proof states.
    pub fn public_inputs(&self) -> &[F] {
        &self.proof.public_inputs
    }

    /// Serializes to the file format above.
    pub fn to_bytes(&self) -> Vec<u8> {
        let g = &self.geometry;
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.protocol_version.minor.to_le_bytes());
        out.extend_from_slice(&self.protocol_version.patch.to_le_bytes());
        out.push(g.state_tree_depth);
        for c in [g.tx_chunk, g.vm_chunk, g.storage_chunk] {
            out.extend_from_slice(&c.to_le_bytes());
        }
        out.extend_from_slice(&[g.leaf_fan_in, g.node_fan_in, g.max_node_depth]);
        out.extend_from_slice(&self.proof.to_bytes());
        out
    }
}

/// Parses a final proof file's header (the table above): the protocol version and geometry the
/// proof was made under. The compression proof follows at byte [`HEADER_LEN`]; it parses only
/// with that circuit's verifier data, which [`verify`] loads for this version and geometry after
/// this check, so a malformed header is refused before any setup data is loaded or built.
///
/// Errors: [`VerifyError::Format`], naming the byte: fewer than [`HEADER_LEN`] bytes, another
/// magic than `PMFP`, a format version other than 1, a geometry out of bounds
/// ([`Geometry::validate`]).
pub fn parse_header(bytes: &[u8]) -> Result<(ProtocolVersion, Geometry), VerifyError> {
    if bytes.len() < HEADER_LEN {
        return Err(VerifyError::Format(format!("truncated header: {} of {HEADER_LEN} bytes", bytes.len())));
    }
    if bytes[0..4] != MAGIC {
        return Err(VerifyError::Format("magic at byte 0: expected \"PMFP\"".into()));
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    if u16_at(4) != VERSION {
        return Err(VerifyError::Format(format!("format version at byte 4: unsupported {}", u16_at(4))));
    }
    let version = ProtocolVersion { minor: u16_at(6), patch: u16_at(8) };
    let geometry = Geometry {
        state_tree_depth: bytes[10],
        tx_chunk: u16_at(11),
        vm_chunk: u16_at(13),
        storage_chunk: u16_at(15),
        leaf_fan_in: bytes[17],
        node_fan_in: bytes[18],
        max_node_depth: bytes[19],
    };
    geometry.validate().map_err(|e| VerifyError::Format(format!("geometry at byte 10: {e}")))?;
    Ok((version, geometry))
}

/// Verifies a final proof file against a batch file. `setup_root` caches verifier data (built on
/// first use for the proof's version and geometry). Returns the batch's public data on success.
/// The header and the batch file are checked before any setup data is loaded or built.
pub fn verify(proof_bytes: &[u8], batch_bytes: &[u8], setup_root: &Path) -> Result<PublicData, VerifyError> {
    let (version, geometry) = parse_header(proof_bytes)?;
    let (batch, expected) = batch_of(version, &geometry, batch_bytes)?;
    let store = SetupStore::new(setup_root, version, geometry).map_err(|e| VerifyError::Setup(e.to_string()))?;
    verify_batch(&store, &batch, expected, proof_bytes)
}

/// [`verify`] with the setup data already open: the compressor checks the final proof it made
/// against its batch before it reports (issue 16 rule 3), with the store it proved from. The
/// proof's header must name `version` and `store`'s geometry ([`VerifyError::Format`] if not).
pub fn verify_in(store: &SetupStore, version: ProtocolVersion, proof_bytes: &[u8], batch_bytes: &[u8]) -> Result<PublicData, VerifyError> {
    let (header_version, geometry) = parse_header(proof_bytes)?;
    if header_version != version || geometry != *store.geometry() {
        return Err(VerifyError::Format(format!(
            "proof header names protocol version {header_version} and geometry {geometry:?}, the setup data is for {version} and {:?}",
            store.geometry()
        )));
    }
    let (batch, expected) = batch_of(version, &geometry, batch_bytes)?;
    verify_batch(store, &batch, expected, proof_bytes)
}

/// The batch file, parsed, checked against the proof header's version and geometry, and
/// replayed: its public data.
fn batch_of(version: ProtocolVersion, geometry: &Geometry, batch_bytes: &[u8]) -> Result<(Batch, PublicData), VerifyError> {
    let batch = Batch::from_bytes(batch_bytes)?;
    if batch.protocol_version != version {
        return Err(VerifyError::Format(format!(
            "proof is for protocol version {version}, the batch is {}",
            batch.protocol_version
        )));
    }
    if batch.state_tree_depth != geometry.state_tree_depth {
        return Err(VerifyError::Format(format!(
            "proof's geometry has state tree depth {}, the batch {}",
            geometry.state_tree_depth, batch.state_tree_depth
        )));
    }
    let expected = PublicData::from_replay(&batch, &replay(&batch)?);
    Ok((batch, expected))
}

/// The proof body checked against `batch`'s replayed public data `expected`, with `store`'s
/// verifier data.
fn verify_batch(store: &SetupStore, batch: &Batch, expected: PublicData, proof_bytes: &[u8]) -> Result<PublicData, VerifyError> {
    let vd = store.verifier(CircuitKey::Compression).map_err(|e| VerifyError::Setup(format!("{e:#}")))?;
    let proof = catch_panic(|| {
        CompressedProofWithPublicInputs::<F, C, D>::from_bytes(proof_bytes[HEADER_LEN..].to_vec(), &vd.common)
    })
    .and_then(|r| r.map_err(|e| e.to_string()))
    .map_err(|e| VerifyError::Format(format!("proof body at byte {HEADER_LEN}: {e}")))?;
    if proof.public_inputs != expected.to_public_inputs() {
        use plonky2::field::types::PrimeField64;
        return Err(VerifyError::WrongBatch {
            proof_batch: proof.public_inputs.first().map_or(0, |e| e.to_canonical_u64()),
            batch: batch.number.0,
        });
    }
    // plonky2 panics on some malformed proofs instead of returning an error.
    catch_panic(|| vd.verify_compressed(proof))
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(VerifyError::Invalid)?;
    Ok(expected)
}
