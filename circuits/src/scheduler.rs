//! Round 4: the scheduler. Verifies the recursion tip's proof against the tip's fixed verifier
//! data and binds it to the batch's public data: the batch number and protocol version join the
//! tip's roots and transaction commitment, and their Poseidon hash (the batch commitment) is
//! computed in-circuit.
//!
//! Public inputs (18), in the order of [`crate::state::PublicData::to_public_inputs`]:
//! `batch_number, protocol_version, prev_state_root[4], new_state_root[4], tx_commitment[4],
//! batch_commitment[4]`.

use plonky2::iop::target::Target;
use plonky2::iop::witness::{PartialWitness, WitnessWrite};
use plonky2::plonk::circuit_builder::CircuitBuilder;
use plonky2::plonk::circuit_data::{CircuitConfig, VerifierCircuitData};
use plonky2::plonk::proof::{ProofWithPublicInputs, ProofWithPublicInputsTarget};
use plonky2::util::serialization::{Buffer, IoResult, Read, Write};
use proofmesh_core::{BatchNumber, ProtocolVersion};

use crate::gadgets::hash;
use crate::{C, D, F};
use plonky2::field::types::Field;

/// Where the scheduler's witness goes.
#[derive(Debug, Clone)]
pub struct SchedulerTargets {
    tip: ProofWithPublicInputsTarget<D>,
    batch_number: Target,
    protocol_version: Target,
}

/// Builds the scheduler circuit over the tip circuit `tip`.
pub fn build(tip: &VerifierCircuitData<F, C, D>, config: CircuitConfig) -> (CircuitBuilder<F, D>, SchedulerTargets) {
    let mut b = CircuitBuilder::<F, D>::new(config);
    let vd = b.constant_verifier_data(&tip.verifier_only);
    let proof = b.add_virtual_proof_with_pis(&tip.common);
    b.verify_proof::<C>(&proof, &vd, &tip.common);
    let batch_number = b.add_virtual_target();
    let protocol_version = b.add_virtual_target();
    b.range_check(batch_number, 32);
    b.range_check(protocol_version, 32);
    let mut head = vec![batch_number, protocol_version];
    head.extend_from_slice(&proof.public_inputs);
    let commitment = hash(&mut b, head.clone());
    b.register_public_inputs(&head);
    b.register_public_inputs(&commitment.elements);
    (b, SchedulerTargets { tip: proof, batch_number, protocol_version })
}

impl SchedulerTargets {
    /// Fills the witness: the tip proof and the batch's number and protocol version.
    pub fn fill(&self, tip: &ProofWithPublicInputs<F, C, D>, batch: BatchNumber, version: ProtocolVersion) -> anyhow::Result<PartialWitness<F>> {
        let mut pw = PartialWitness::new();
        pw.set_proof_with_pis_target(&self.tip, tip)?;
        pw.set_target(self.batch_number, F::from_canonical_u32(batch.0))?;
        pw.set_target(self.protocol_version, F::from_canonical_u32(version.packed()))?;
        Ok(pw)
    }

    /// Serializes the targets.
    pub fn write(&self, buf: &mut Vec<u8>) -> IoResult<()> {
        buf.write_target_proof_with_public_inputs(&self.tip)?;
        buf.write_target(self.batch_number)?;
        buf.write_target(self.protocol_version)
    }

    /// Reads targets written by [`SchedulerTargets::write`].
    pub fn read(buf: &mut Buffer) -> IoResult<Self> {
        Ok(SchedulerTargets {
            tip: buf.read_target_proof_with_public_inputs()?,
            batch_number: buf.read_target()?,
            protocol_version: buf.read_target()?,
        })
    }
}
