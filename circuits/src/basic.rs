//! Round 0: the basic circuits. Each type checks one aspect of a chunk of the batch and exposes
//! what it started from and ended at as public inputs, `in[8] || out[8]`:
//!
//! | id | type | state (`[h0, h1]`) | per item |
//! |---|---|---|---|
//! | 1 | transaction hasher (light) | `[tx_commitment, 0]` | one Poseidon link |
//! | 2 | main VM (medium) | `[tx_commitment, access_commitment]` | a transfer's rules: nonce, no underflow or overflow (range checks), the two writes it makes |
//! | 3 | storage application (heavy) | `[state_root, access_commitment]` | a Merkle update: the old leaf opens to the root, the new leaf gives the next root |
//!
//! The types are tied by commitments, as Boojum's circuits are: the hasher and the VM must reach
//! the same transaction commitment, the VM and the storage circuit the same access commitment;
//! the recursion tip asserts both. Every item slot has an `active` flag: an inactive slot (the
//! padding of a batch's last chunk) leaves the state unchanged.

use plonky2::field::types::Field;
use plonky2::hash::hash_types::HashOutTarget;
use plonky2::iop::target::{BoolTarget, Target};
use plonky2::iop::witness::{PartialWitness, WitnessWrite};
use plonky2::plonk::circuit_builder::CircuitBuilder;
use plonky2::plonk::circuit_data::CircuitConfig;
use plonky2::util::serialization::{Buffer, IoResult, Read, Write};
use proofmesh_core::{CircuitId, Geometry};

use crate::batch::{Account, Batch, StorageAccess, Transaction, BALANCE_BITS};
use crate::gadgets::{connect_if, hash, link, select_hash, state_elements, virtual_state, zero_hash};
use crate::state::{access_elements, tx_elements, Digest, Replay, ZERO};
use crate::{F, D};

/// The basic circuit types, with their circuit ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BasicCircuit {
    /// Id 1: hashes the published transactions into the transaction commitment.
    TxHasher = 1,
    /// Id 2: executes the transfers, producing both commitments.
    MainVm = 2,
    /// Id 3: applies the writes to the Poseidon state tree.
    StorageApplication = 3,
}

impl BasicCircuit {
    /// All types, in circuit-id order.
    pub const ALL: [BasicCircuit; 3] = [Self::TxHasher, Self::MainVm, Self::StorageApplication];

    /// The circuit id.
    pub fn id(self) -> CircuitId {
        CircuitId(self as u8)
    }

    /// The type with this circuit id, if any.
    pub fn from_id(id: CircuitId) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.id() == id)
    }

    /// Short name for logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::TxHasher => "tx_hasher",
            Self::MainVm => "main_vm",
            Self::StorageApplication => "storage",
        }
    }

    /// Items (transactions or accesses) per circuit under `g`.
    pub fn chunk(self, g: &Geometry) -> usize {
        usize::from(match self {
            Self::TxHasher => g.tx_chunk,
            Self::MainVm => g.vm_chunk,
            Self::StorageApplication => g.storage_chunk,
        })
    }

    /// Items of this type in a batch with `txs` transactions.
    pub fn items(self, txs: usize) -> usize {
        match self {
            Self::StorageApplication => 2 * txs,
            _ => txs,
        }
    }

    /// Basic circuits of this type for a batch of `txs` transactions (at least one).
    pub fn circuits(self, g: &Geometry, txs: usize) -> usize {
        self.items(txs).div_ceil(self.chunk(g)).max(1)
    }
}

/// One basic circuit's witness: its starting state and its items. Produced by witness
/// generation from a replayed batch ([`chunk_inputs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BasicInput {
    /// A chunk of transactions to hash.
    TxHasher {
        /// Transaction commitment before the chunk.
        tx_commitment: Digest,
        /// At most `tx_chunk` transactions.
        txs: Vec<Transaction>,
    },
    /// A chunk of transactions to execute, each with its two accesses.
    MainVm {
        /// Transaction commitment before the chunk.
        tx_commitment: Digest,
        /// Access commitment before the chunk.
        access_commitment: Digest,
        /// At most `vm_chunk` transactions.
        txs: Vec<Transaction>,
        /// `2 * txs.len()` accesses (sender, receiver per transaction).
        accesses: Vec<StorageAccess>,
    },
    /// A chunk of writes to apply.
    StorageApplication {
        /// State root before the chunk.
        root: Digest,
        /// Access commitment before the chunk.
        access_commitment: Digest,
        /// At most `storage_chunk` accesses.
        accesses: Vec<StorageAccess>,
    },
}

impl BasicInput {
    /// The circuit type this input is for.
    pub fn circuit(&self) -> BasicCircuit {
        match self {
            Self::TxHasher { .. } => BasicCircuit::TxHasher,
            Self::MainVm { .. } => BasicCircuit::MainVm,
            Self::StorageApplication { .. } => BasicCircuit::StorageApplication,
        }
    }
}

/// Cuts a replayed batch into the inputs of every basic circuit of type `circuit`, in order.
pub fn chunk_inputs(batch: &Batch, replay: &Replay, g: &Geometry, circuit: BasicCircuit) -> Vec<BasicInput> {
    let chunk = circuit.chunk(g);
    (0..circuit.circuits(g, batch.transactions.len()))
        .map(|i| {
            let start = i * chunk;
            let end = (start + chunk).min(circuit.items(batch.transactions.len()));
            match circuit {
                BasicCircuit::TxHasher => BasicInput::TxHasher {
                    tx_commitment: replay.tx_commitments[start],
                    txs: batch.transactions[start..end].to_vec(),
                },
                BasicCircuit::MainVm => BasicInput::MainVm {
                    tx_commitment: replay.tx_commitments[start],
                    access_commitment: replay.access_commitments[2 * start],
                    txs: batch.transactions[start..end].to_vec(),
                    accesses: batch.storage_accesses[2 * start..2 * end].to_vec(),
                },
                BasicCircuit::StorageApplication => BasicInput::StorageApplication {
                    root: replay.roots[start],
                    access_commitment: replay.access_commitments[start],
                    accesses: batch.storage_accesses[start..end].to_vec(),
                },
            }
        })
        .collect()
}

/// The witness targets of one transaction slot.
#[derive(Debug, Clone)]
struct TxSlot {
    active: BoolTarget,
    tx: [Target; 4],
}

/// The witness targets of one main-VM slot: the transaction and the two accounts it reads.
#[derive(Debug, Clone)]
struct VmSlot {
    tx: TxSlot,
    sender: [Target; 2],
    receiver: [Target; 2],
}

/// The witness targets of one storage-access slot.
#[derive(Debug, Clone)]
struct StorageSlot {
    active: BoolTarget,
    key: Target,
    old: [Target; 2],
    new: [Target; 2],
    siblings: Vec<HashOutTarget>,
}

/// Where a basic circuit's witness goes: its starting state and its item slots.
#[derive(Debug, Clone)]
pub struct BasicTargets {
    circuit: BasicCircuit,
    state_in: [HashOutTarget; 2],
    tx_slots: Vec<TxSlot>,
    vm_slots: Vec<VmSlot>,
    storage_slots: Vec<StorageSlot>,
}

fn tx_slot(b: &mut CircuitBuilder<F, D>) -> TxSlot {
    TxSlot { active: b.add_virtual_bool_target_safe(), tx: std::array::from_fn(|_| b.add_virtual_target()) }
}

/// Builds basic circuit `circuit` under geometry `g` with `config`. Public inputs: `in[8] || out[8]`.
pub fn build(circuit: BasicCircuit, g: &Geometry, config: CircuitConfig) -> (CircuitBuilder<F, D>, BasicTargets) {
    let mut b = CircuitBuilder::<F, D>::new(config);
    let state_in = virtual_state(&mut b);
    let mut t = BasicTargets { circuit, state_in, tx_slots: vec![], vm_slots: vec![], storage_slots: vec![] };
    let chunk = circuit.chunk(g);
    let depth = usize::from(g.state_tree_depth);
    let out = match circuit {
        BasicCircuit::TxHasher => {
            let zero = zero_hash(&mut b);
            b.connect_hashes(state_in[1], zero);
            let mut txc = state_in[0];
            for _ in 0..chunk {
                let s = tx_slot(&mut b);
                let next = link(&mut b, txc, &s.tx);
                txc = select_hash(&mut b, s.active, next, txc);
                t.tx_slots.push(s);
            }
            [txc, zero]
        }
        BasicCircuit::MainVm => {
            let [mut txc, mut acc] = state_in;
            for _ in 0..chunk {
                let s = VmSlot {
                    tx: tx_slot(&mut b),
                    sender: std::array::from_fn(|_| b.add_virtual_target()),
                    receiver: std::array::from_fn(|_| b.add_virtual_target()),
                };
                let [from, to, amount, nonce] = s.tx.tx;
                let active = s.tx.active;
                b.range_check(from, depth);
                b.range_check(to, depth);
                b.range_check(amount, BALANCE_BITS as usize);
                b.range_check(s.receiver[0], BALANCE_BITS as usize);
                b.range_check(s.receiver[1], 32);
                // The sender's nonce must be the transaction's.
                connect_if(&mut b, active, s.sender[1], nonce);
                // Debit: no underflow (the difference stays below 2^56); nonce + 1 below 2^32.
                let sender_balance = b.sub(s.sender[0], amount);
                b.range_check(sender_balance, BALANCE_BITS as usize);
                let sender_nonce = b.add_const(s.sender[1], F::ONE);
                b.range_check(sender_nonce, 32);
                // Credit: no overflow past 2^56.
                let receiver_balance = b.add(s.receiver[0], amount);
                b.range_check(receiver_balance, BALANCE_BITS as usize);

                let next = link(&mut b, txc, &s.tx.tx);
                txc = select_hash(&mut b, active, next, txc);
                let write_s = [from, s.sender[0], s.sender[1], sender_balance, sender_nonce];
                let next = link(&mut b, acc, &write_s);
                acc = select_hash(&mut b, active, next, acc);
                let write_r = [to, s.receiver[0], s.receiver[1], receiver_balance, s.receiver[1]];
                let next = link(&mut b, acc, &write_r);
                acc = select_hash(&mut b, active, next, acc);
                t.vm_slots.push(s);
            }
            [txc, acc]
        }
        BasicCircuit::StorageApplication => {
            let [mut root, mut acc] = state_in;
            for _ in 0..chunk {
                let s = StorageSlot {
                    active: b.add_virtual_bool_target_safe(),
                    key: b.add_virtual_target(),
                    old: std::array::from_fn(|_| b.add_virtual_target()),
                    new: std::array::from_fn(|_| b.add_virtual_target()),
                    siblings: (0..depth).map(|_| b.add_virtual_hash()).collect(),
                };
                // Also constrains key < 2^depth.
                let bits = b.split_le(s.key, depth);
                let mut cur_old = hash(&mut b, s.old.to_vec());
                let mut cur_new = hash(&mut b, s.new.to_vec());
                for (bit, sib) in bits.iter().zip(&s.siblings) {
                    for cur in [&mut cur_old, &mut cur_new] {
                        let left = select_hash(&mut b, *bit, *sib, *cur);
                        let right = select_hash(&mut b, *bit, *cur, *sib);
                        let mut v = left.elements.to_vec();
                        v.extend_from_slice(&right.elements);
                        *cur = hash(&mut b, v);
                    }
                }
                for i in 0..4 {
                    connect_if(&mut b, s.active, cur_old.elements[i], root.elements[i]);
                }
                root = select_hash(&mut b, s.active, cur_new, root);
                let write = [s.key, s.old[0], s.old[1], s.new[0], s.new[1]];
                let next = link(&mut b, acc, &write);
                acc = select_hash(&mut b, s.active, next, acc);
                t.storage_slots.push(s);
            }
            [root, acc]
        }
    };
    b.register_public_inputs(&state_elements(&state_in));
    b.register_public_inputs(&state_elements(&out));
    (b, t)
}

fn set_account(pw: &mut PartialWitness<F>, t: &[Target; 2], a: Account) -> anyhow::Result<()> {
    pw.set_target(t[0], F::from_canonical_u64(a.balance))?;
    pw.set_target(t[1], F::from_canonical_u32(a.nonce))
}

fn set_tx(pw: &mut PartialWitness<F>, s: &TxSlot, tx: Option<&Transaction>) -> anyhow::Result<()> {
    pw.set_bool_target(s.active, tx.is_some())?;
    let values = tx.map(tx_elements).unwrap_or([F::ZERO; 4]);
    pw.set_target_arr(&s.tx, &values)
}

impl BasicTargets {
    /// Fills the witness of `input`. Errors if `input` is for another circuit type or has more
    /// items than the circuit has slots.
    pub fn fill(&self, input: &BasicInput) -> anyhow::Result<PartialWitness<F>> {
        anyhow::ensure!(
            input.circuit() == self.circuit,
            "a {} input given to the {} circuit",
            input.circuit().name(),
            self.circuit.name()
        );
        let mut pw = PartialWitness::new();
        let too_many = |n: usize, slots: usize| anyhow::anyhow!("{n} items for a circuit of {slots} slots");
        match input {
            BasicInput::TxHasher { tx_commitment, txs } => {
                anyhow::ensure!(txs.len() <= self.tx_slots.len(), too_many(txs.len(), self.tx_slots.len()));
                pw.set_hash_target(self.state_in[0], *tx_commitment)?;
                for (i, s) in self.tx_slots.iter().enumerate() {
                    set_tx(&mut pw, s, txs.get(i))?;
                }
            }
            BasicInput::MainVm { tx_commitment, access_commitment, txs, accesses } => {
                anyhow::ensure!(txs.len() <= self.vm_slots.len(), too_many(txs.len(), self.vm_slots.len()));
                anyhow::ensure!(accesses.len() == 2 * txs.len(), "main VM input needs 2 accesses per transaction");
                pw.set_hash_target(self.state_in[0], *tx_commitment)?;
                pw.set_hash_target(self.state_in[1], *access_commitment)?;
                for (i, s) in self.vm_slots.iter().enumerate() {
                    set_tx(&mut pw, &s.tx, txs.get(i))?;
                    let (sender, receiver) = match accesses.get(2 * i..2 * i + 2) {
                        Some([a, b]) => (a.old, b.old),
                        _ => (Account::default(), Account::default()),
                    };
                    set_account(&mut pw, &s.sender, sender)?;
                    set_account(&mut pw, &s.receiver, receiver)?;
                }
            }
            BasicInput::StorageApplication { root, access_commitment, accesses } => {
                anyhow::ensure!(accesses.len() <= self.storage_slots.len(), too_many(accesses.len(), self.storage_slots.len()));
                pw.set_hash_target(self.state_in[0], *root)?;
                pw.set_hash_target(self.state_in[1], *access_commitment)?;
                for (i, s) in self.storage_slots.iter().enumerate() {
                    let a = accesses.get(i);
                    pw.set_bool_target(s.active, a.is_some())?;
                    let padding;
                    let a = match a {
                        Some(a) => a,
                        None => {
                            padding = StorageAccess {
                                key: 0,
                                old: Account::default(),
                                new: Account::default(),
                                siblings: vec![[0; 4]; s.siblings.len()],
                            };
                            &padding
                        }
                    };
                    anyhow::ensure!(a.siblings.len() == s.siblings.len(), "access {i}: {} siblings, the circuit has depth {}", a.siblings.len(), s.siblings.len());
                    let e = access_elements(a.key, a.old, a.new);
                    pw.set_target(s.key, e[0])?;
                    pw.set_target_arr(&s.old, &e[1..3])?;
                    pw.set_target_arr(&s.new, &e[3..5])?;
                    for (t, v) in s.siblings.iter().zip(&a.siblings) {
                        pw.set_hash_target(*t, crate::state::digest_from_u64s(*v))?;
                    }
                }
            }
        }
        Ok(pw)
    }

    /// Serializes the targets (stored beside the setup data, so a loaded circuit can be filled).
    pub fn write(&self, buf: &mut Vec<u8>) -> IoResult<()> {
        buf.write_u32(self.circuit as u32)?;
        for h in &self.state_in {
            buf.write_target_hash(h)?;
        }
        buf.write_usize(self.tx_slots.len())?;
        for s in &self.tx_slots {
            write_tx_slot(buf, s)?;
        }
        buf.write_usize(self.vm_slots.len())?;
        for s in &self.vm_slots {
            write_tx_slot(buf, &s.tx)?;
            buf.write_target_vec(&s.sender)?;
            buf.write_target_vec(&s.receiver)?;
        }
        buf.write_usize(self.storage_slots.len())?;
        for s in &self.storage_slots {
            buf.write_target_bool(s.active)?;
            buf.write_target(s.key)?;
            buf.write_target_vec(&s.old)?;
            buf.write_target_vec(&s.new)?;
            buf.write_usize(s.siblings.len())?;
            for h in &s.siblings {
                buf.write_target_hash(h)?;
            }
        }
        Ok(())
    }

    /// Reads targets written by [`BasicTargets::write`].
    pub fn read(buf: &mut Buffer) -> IoResult<Self> {
        let circuit = match buf.read_u32()? {
            1 => BasicCircuit::TxHasher,
            2 => BasicCircuit::MainVm,
            3 => BasicCircuit::StorageApplication,
            _ => return Err(plonky2::util::serialization::IoError),
        };
        let state_in = [buf.read_target_hash()?, buf.read_target_hash()?];
        let n = buf.read_usize()?;
        let tx_slots = (0..n).map(|_| read_tx_slot(buf)).collect::<IoResult<_>>()?;
        let n = buf.read_usize()?;
        let vm_slots = (0..n)
            .map(|_| {
                Ok(VmSlot { tx: read_tx_slot(buf)?, sender: read_pair(buf)?, receiver: read_pair(buf)? })
            })
            .collect::<IoResult<_>>()?;
        let n = buf.read_usize()?;
        let storage_slots = (0..n)
            .map(|_| {
                let active = buf.read_target_bool()?;
                let key = buf.read_target()?;
                let old = read_pair(buf)?;
                let new = read_pair(buf)?;
                let depth = buf.read_usize()?;
                let siblings = (0..depth).map(|_| buf.read_target_hash()).collect::<IoResult<_>>()?;
                Ok(StorageSlot { active, key, old, new, siblings })
            })
            .collect::<IoResult<_>>()?;
        Ok(BasicTargets { circuit, state_in, tx_slots, vm_slots, storage_slots })
    }
}

fn write_tx_slot(buf: &mut Vec<u8>, s: &TxSlot) -> IoResult<()> {
    buf.write_target_bool(s.active)?;
    buf.write_target_vec(&s.tx)
}

fn read_tx_slot(buf: &mut Buffer) -> IoResult<TxSlot> {
    let active = buf.read_target_bool()?;
    let tx = buf.read_target_vec()?.try_into().map_err(|_| plonky2::util::serialization::IoError)?;
    Ok(TxSlot { active, tx })
}

fn read_pair(buf: &mut Buffer) -> IoResult<[Target; 2]> {
    buf.read_target_vec()?.try_into().map_err(|_| plonky2::util::serialization::IoError)
}

/// The starting state a basic circuit exposes, natively (for tests and checks).
pub fn state_in(input: &BasicInput) -> [Digest; 2] {
    match input {
        BasicInput::TxHasher { tx_commitment, .. } => [*tx_commitment, ZERO],
        BasicInput::MainVm { tx_commitment, access_commitment, .. } => [*tx_commitment, *access_commitment],
        BasicInput::StorageApplication { root, access_commitment, .. } => [*root, *access_commitment],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheduler_knows_every_basic_circuit_id() {
        let ids: Vec<CircuitId> = BasicCircuit::ALL.iter().map(|c| c.id()).collect();
        assert_eq!(ids, CircuitId::BASIC.to_vec());
    }
}
