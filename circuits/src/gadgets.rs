//! Small in-circuit helpers shared by the circuits.

use plonky2::hash::hash_types::HashOutTarget;
use plonky2::hash::poseidon::PoseidonHash;
use plonky2::iop::target::{BoolTarget, Target};
use plonky2::plonk::circuit_builder::CircuitBuilder;

use crate::{F, D};

/// `H(inputs)`, Poseidon sponge without padding (native: `PoseidonHash::hash_no_pad`).
pub fn hash(b: &mut CircuitBuilder<F, D>, inputs: Vec<Target>) -> HashOutTarget {
    b.hash_n_to_hash_no_pad::<PoseidonHash>(inputs)
}

/// `H(h || rest)`: one link of a running commitment.
pub fn link(b: &mut CircuitBuilder<F, D>, h: HashOutTarget, rest: &[Target]) -> HashOutTarget {
    let mut v = h.elements.to_vec();
    v.extend_from_slice(rest);
    hash(b, v)
}

/// `cond ? x : y`, element-wise.
pub fn select_hash(b: &mut CircuitBuilder<F, D>, cond: BoolTarget, x: HashOutTarget, y: HashOutTarget) -> HashOutTarget {
    HashOutTarget { elements: std::array::from_fn(|i| b.select(cond, x.elements[i], y.elements[i])) }
}

/// Constrains `cond * (x - y) == 0`: `x == y` whenever `cond` holds.
pub fn connect_if(b: &mut CircuitBuilder<F, D>, cond: BoolTarget, x: Target, y: Target) {
    let diff = b.sub(x, y);
    let gated = b.mul(cond.target, diff);
    b.assert_zero(gated);
}

/// A fresh hash target whose elements are all the constant zero.
pub fn zero_hash(b: &mut CircuitBuilder<F, D>) -> HashOutTarget {
    let z = b.zero();
    HashOutTarget { elements: [z; 4] }
}

/// Two virtual hash targets: a running state of 8 elements.
pub fn virtual_state(b: &mut CircuitBuilder<F, D>) -> [HashOutTarget; 2] {
    [b.add_virtual_hash(), b.add_virtual_hash()]
}

/// The 8 elements of a state.
pub fn state_elements(s: &[HashOutTarget; 2]) -> Vec<Target> {
    s.iter().flat_map(|h| h.elements).collect()
}
