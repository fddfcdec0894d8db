//! Compression: the scheduler proof wrapped into a smaller final proof. The wrapper verifies the
//! scheduler proof against its fixed verifier data and re-exposes its 18 public inputs; what
//! changes is the FRI configuration, tuned for proof size instead of prover speed: a higher
//! rate (blowup 2^5 instead of 2^3) buys fewer queries (17 instead of 28) at the same
//! conjectured security (rate_bits * queries + proof-of-work bits ~ 100), and the final proof is
//! stored in plonky2's compressed form (shared Merkle path nodes deduplicated).
//!
//! This is the role Boojum's compression wrapper plays before the SNARK wrapper; the L1-facing
//! SNARK wrap is out of scope here.

use plonky2::fri::{FriConfig, FriReductionStrategy};
use plonky2::iop::witness::{PartialWitness, WitnessWrite};
use plonky2::plonk::circuit_builder::CircuitBuilder;
use plonky2::plonk::circuit_data::{CircuitConfig, VerifierCircuitData};
use plonky2::plonk::proof::{ProofWithPublicInputs, ProofWithPublicInputsTarget};
use plonky2::util::serialization::{Buffer, IoResult, Read, Write};

use crate::{C, D, F};

/// The size-tuned configuration of the compression circuit.
pub fn config() -> CircuitConfig {
    CircuitConfig {
        fri_config: FriConfig {
            rate_bits: 5,
            cap_height: 4,
            proof_of_work_bits: 16,
            reduction_strategy: FriReductionStrategy::ConstantArityBits(4, 5),
            num_query_rounds: 17,
        },
        ..CircuitConfig::standard_recursion_config()
    }
}

/// Where the compression circuit's witness goes.
#[derive(Debug, Clone)]
pub struct CompressionTargets {
    inner: ProofWithPublicInputsTarget<D>,
}

/// Builds the compression circuit over the scheduler circuit `scheduler`.
pub fn build(scheduler: &VerifierCircuitData<F, C, D>) -> (CircuitBuilder<F, D>, CompressionTargets) {
    let mut b = CircuitBuilder::<F, D>::new(config());
    let vd = b.constant_verifier_data(&scheduler.verifier_only);
    let inner = b.add_virtual_proof_with_pis(&scheduler.common);
    b.verify_proof::<C>(&inner, &vd, &scheduler.common);
    b.register_public_inputs(&inner.public_inputs);
    (b, CompressionTargets { inner })
}

impl CompressionTargets {
    /// Fills the witness with the scheduler proof.
    pub fn fill(&self, scheduler_proof: &ProofWithPublicInputs<F, C, D>) -> anyhow::Result<PartialWitness<F>> {
        let mut pw = PartialWitness::new();
        pw.set_proof_with_pis_target(&self.inner, scheduler_proof)?;
        Ok(pw)
    }

    /// Serializes the targets.
    pub fn write(&self, buf: &mut Vec<u8>) -> IoResult<()> {
        buf.write_target_proof_with_public_inputs(&self.inner)
    }

    /// Reads targets written by [`CompressionTargets::write`].
    pub fn read(buf: &mut Buffer) -> IoResult<Self> {
        Ok(CompressionTargets { inner: buf.read_target_proof_with_public_inputs()? })
    }
}
