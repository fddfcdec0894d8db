//! Rounds 1 and 2: leaf and node aggregation. One circuit shape serves both: it verifies up to
//! `fan_in` proofs of one circuit (a basic type for a leaf; the leaf or the node level below for
//! a node) against that circuit's verifier data, **fixed as constants** in this circuit, and
//! checks that they chain: `out[i] == in[i + 1]` for every used slot.
//!
//! Public inputs: `in[8] || out[8]`, where `in` is the first proof's `in` and `out` the last used
//! proof's `out`, the same shape as the basic circuits', so aggregation composes.
//!
//! Unused slots: slot 0 is always used; slot `i > 0` has an `active` flag, and active slots
//! form a prefix (`active[i] => active[i - 1]`). An inactive slot still verifies a valid proof of
//! the inner circuit (the prover repeats proof 0), but is ignored for chaining and output.

use plonky2::iop::target::{BoolTarget, Target};
use plonky2::iop::witness::{PartialWitness, WitnessWrite};
use plonky2::plonk::circuit_builder::CircuitBuilder;
use plonky2::plonk::circuit_data::{CircuitConfig, VerifierCircuitData};
use plonky2::plonk::proof::{ProofWithPublicInputs, ProofWithPublicInputsTarget};
use plonky2::util::serialization::{Buffer, IoResult, Read, Write};

use crate::gadgets::connect_if;
use crate::{C, D, F};

/// Public inputs of basic, leaf and node proofs: `in[8] || out[8]`.
pub const CHAIN_PUBLIC_INPUTS: usize = 16;

/// Where an aggregation circuit's witness goes.
#[derive(Debug, Clone)]
pub struct AggregationTargets {
    proofs: Vec<ProofWithPublicInputsTarget<D>>,
    /// `active[i]` for slot `i + 1`.
    active: Vec<BoolTarget>,
}

/// Builds an aggregation circuit over `fan_in` proofs of `inner`.
pub fn build(inner: &VerifierCircuitData<F, C, D>, fan_in: usize, config: CircuitConfig) -> (CircuitBuilder<F, D>, AggregationTargets) {
    assert_eq!(inner.common.num_public_inputs, CHAIN_PUBLIC_INPUTS, "inner circuit is not a chain circuit");
    let mut b = CircuitBuilder::<F, D>::new(config);
    let vd = b.constant_verifier_data(&inner.verifier_only);
    let proofs: Vec<_> = (0..fan_in)
        .map(|_| {
            let p = b.add_virtual_proof_with_pis(&inner.common);
            b.verify_proof::<C>(&p, &vd, &inner.common);
            p
        })
        .collect();
    let active: Vec<BoolTarget> = (1..fan_in).map(|_| b.add_virtual_bool_target_safe()).collect();
    let mut flags = vec![b._true()];
    flags.extend(active.iter().copied());

    for i in 1..fan_in {
        // Prefix: active[i] implies active[i - 1].
        let both = b.and(flags[i], flags[i - 1]);
        b.connect(both.target, flags[i].target);
        for j in 0..8 {
            connect_if(&mut b, flags[i], proofs[i - 1].public_inputs[8 + j], proofs[i].public_inputs[j]);
        }
    }
    // out = sum_i (flag[i] - flag[i + 1]) * out_i: exactly the last active slot's out.
    let out: Vec<Target> = (0..8)
        .map(|j| {
            let mut acc = b.zero();
            for i in 0..fan_in {
                let next = if i + 1 < fan_in { flags[i + 1].target } else { b.zero() };
                let last = b.sub(flags[i].target, next);
                acc = b.mul_add(last, proofs[i].public_inputs[8 + j], acc);
            }
            acc
        })
        .collect();
    b.register_public_inputs(&proofs[0].public_inputs[..8]);
    b.register_public_inputs(&out);
    (b, AggregationTargets { proofs, active })
}

impl AggregationTargets {
    /// Fills the witness with `proofs` (1..=fan_in, in chain order).
    pub fn fill(&self, proofs: &[ProofWithPublicInputs<F, C, D>]) -> anyhow::Result<PartialWitness<F>> {
        anyhow::ensure!(
            !proofs.is_empty() && proofs.len() <= self.proofs.len(),
            "{} proofs for an aggregation circuit of fan-in {}",
            proofs.len(),
            self.proofs.len()
        );
        let mut pw = PartialWitness::new();
        for (i, t) in self.proofs.iter().enumerate() {
            pw.set_proof_with_pis_target(t, proofs.get(i).unwrap_or(&proofs[0]))?;
        }
        for (i, a) in self.active.iter().enumerate() {
            pw.set_bool_target(*a, i + 1 < proofs.len())?;
        }
        Ok(pw)
    }

    /// Serializes the targets.
    pub fn write(&self, buf: &mut Vec<u8>) -> IoResult<()> {
        buf.write_usize(self.proofs.len())?;
        for p in &self.proofs {
            buf.write_target_proof_with_public_inputs(p)?;
        }
        buf.write_target_bool_vec(&self.active)
    }

    /// Reads targets written by [`AggregationTargets::write`].
    pub fn read(buf: &mut Buffer) -> IoResult<Self> {
        let n = buf.read_usize()?;
        let proofs = (0..n).map(|_| buf.read_target_proof_with_public_inputs()).collect::<IoResult<_>>()?;
        Ok(AggregationTargets { proofs, active: buf.read_target_bool_vec()? })
    }
}
