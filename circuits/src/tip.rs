//! Round 3: the recursion tip. Verifies one node proof per basic circuit type and ties the types
//! together:
//!
//! - the transaction hasher and the main VM start from the zero commitment and reach the same
//!   transaction commitment (what was published is what was executed);
//! - the main VM and the storage circuit start from the zero access commitment and reach the same
//!   one (what was executed is what was written);
//! - the storage circuit's state root runs from the previous root to the new one.
//!
//! A type's node proof comes from whichever node depth its batch needed; the verifier data is
//! chosen in-circuit by a one-hot selector among the node circuits of depths
//! `0..max_node_depth`, all fixed as constants here (not chosen by the prover). This needs all
//! depths of a type to share their common data, which [`build`] checks.
//!
//! Public inputs (12): `prev_state_root[4], new_state_root[4], tx_commitment[4]`.

use plonky2::hash::hash_types::{HashOutTarget, MerkleCapTarget};
use plonky2::iop::target::{BoolTarget, Target};
use plonky2::iop::witness::{PartialWitness, WitnessWrite};
use plonky2::plonk::circuit_builder::CircuitBuilder;
use plonky2::plonk::circuit_data::{CircuitConfig, VerifierCircuitData, VerifierCircuitTarget};
use plonky2::plonk::proof::{ProofWithPublicInputs, ProofWithPublicInputsTarget};
use plonky2::util::serialization::{Buffer, IoResult, Read, Write};

use crate::{C, D, F};

/// Public inputs of the recursion tip.
pub const TIP_PUBLIC_INPUTS: usize = 12;

/// Where the tip's witness goes: per type, its proof and the one-hot depth selector.
#[derive(Debug, Clone)]
pub struct TipTargets {
    proofs: Vec<ProofWithPublicInputsTarget<D>>,
    depth_selectors: Vec<Vec<BoolTarget>>,
}

/// `sum_d sel[d] * constant_d`, element-wise over the verifier data of each depth.
fn select_verifier_data(
    b: &mut CircuitBuilder<F, D>,
    sel: &[BoolTarget],
    options: &[VerifierCircuitData<F, C, D>],
) -> VerifierCircuitTarget {
    let consts: Vec<VerifierCircuitTarget> =
        options.iter().map(|o| b.constant_verifier_data(&o.verifier_only)).collect();
    let mut pick = |get: &dyn Fn(&VerifierCircuitTarget) -> Target| {
        let mut acc = b.zero();
        for (s, c) in sel.iter().zip(&consts) {
            acc = b.mul_add(s.target, get(c), acc);
        }
        acc
    };
    let digest = HashOutTarget { elements: std::array::from_fn(|i| pick(&|c| c.circuit_digest.elements[i])) };
    let cap_len = consts[0].constants_sigmas_cap.0.len();
    let cap = (0..cap_len)
        .map(|k| HashOutTarget { elements: std::array::from_fn(|i| pick(&|c| c.constants_sigmas_cap.0[k].elements[i])) })
        .collect();
    VerifierCircuitTarget { constants_sigmas_cap: MerkleCapTarget(cap), circuit_digest: digest }
}

/// Builds the tip over `nodes[t][d]`: the node circuit of basic type `t` (in circuit-id order:
/// hasher, VM, storage) at depth `d`. Errors if the depths of a type differ in common data.
pub fn build(nodes: &[Vec<VerifierCircuitData<F, C, D>>], config: CircuitConfig) -> anyhow::Result<(CircuitBuilder<F, D>, TipTargets)> {
    anyhow::ensure!(nodes.len() == 3, "the tip takes 3 circuit types, got {}", nodes.len());
    let mut b = CircuitBuilder::<F, D>::new(config);
    let mut proofs = vec![];
    let mut depth_selectors = vec![];
    for (t, depths) in nodes.iter().enumerate() {
        let common = &depths[0].common;
        for (d, v) in depths.iter().enumerate() {
            anyhow::ensure!(
                v.common == *common,
                "node circuits of type {} differ in common data between depth 0 and depth {d}",
                t + 1
            );
        }
        let sel: Vec<BoolTarget> = depths.iter().map(|_| b.add_virtual_bool_target_safe()).collect();
        let sum = sel.iter().fold(b.zero(), |acc, s| b.add(acc, s.target));
        let one = b.one();
        b.connect(sum, one);
        let vd = select_verifier_data(&mut b, &sel, depths);
        let p = b.add_virtual_proof_with_pis(common);
        b.verify_proof::<C>(&p, &vd, common);
        proofs.push(p);
        depth_selectors.push(sel);
    }
    let pi = |p: &ProofWithPublicInputsTarget<D>, range: std::ops::Range<usize>| p.public_inputs[range].to_vec();
    let (hasher, vm, storage) = (&proofs[0], &proofs[1], &proofs[2]);
    let zero = b.zero();
    for i in 0..4 {
        // Both commitments start at zero (hasher in[0..4], VM in[0..8], storage in[4..8]).
        for t in [hasher.public_inputs[i], vm.public_inputs[i], vm.public_inputs[4 + i], storage.public_inputs[4 + i]] {
            b.connect(t, zero);
        }
        // Same transaction commitment at the end; same access commitment at the end.
        b.connect(hasher.public_inputs[8 + i], vm.public_inputs[8 + i]);
        b.connect(vm.public_inputs[12 + i], storage.public_inputs[12 + i]);
    }
    b.register_public_inputs(&pi(storage, 0..4));
    b.register_public_inputs(&pi(storage, 8..12));
    b.register_public_inputs(&pi(hasher, 8..12));
    Ok((b, TipTargets { proofs, depth_selectors }))
}

impl TipTargets {
    /// Fills the witness: per type (circuit-id order), its top node proof and that node's depth.
    pub fn fill(&self, per_type: &[(usize, ProofWithPublicInputs<F, C, D>)]) -> anyhow::Result<PartialWitness<F>> {
        anyhow::ensure!(per_type.len() == self.proofs.len(), "the tip takes {} proofs, got {}", self.proofs.len(), per_type.len());
        let mut pw = PartialWitness::new();
        for ((t, sel), (depth, proof)) in self.proofs.iter().zip(&self.depth_selectors).zip(per_type) {
            anyhow::ensure!(*depth < sel.len(), "node depth {depth} beyond the tip's {} depths", sel.len());
            pw.set_proof_with_pis_target(t, proof)?;
            for (d, s) in sel.iter().enumerate() {
                pw.set_bool_target(*s, d == *depth)?;
            }
        }
        Ok(pw)
    }

    /// Serializes the targets.
    pub fn write(&self, buf: &mut Vec<u8>) -> IoResult<()> {
        buf.write_usize(self.proofs.len())?;
        for (p, s) in self.proofs.iter().zip(&self.depth_selectors) {
            buf.write_target_proof_with_public_inputs(p)?;
            buf.write_target_bool_vec(s)?;
        }
        Ok(())
    }

    /// Reads targets written by [`TipTargets::write`].
    pub fn read(buf: &mut Buffer) -> IoResult<Self> {
        let n = buf.read_usize()?;
        let mut t = TipTargets { proofs: vec![], depth_selectors: vec![] };
        for _ in 0..n {
            t.proofs.push(buf.read_target_proof_with_public_inputs()?);
            t.depth_selectors.push(buf.read_target_bool_vec()?);
        }
        Ok(t)
    }
}
