//! The native model of a batch: the same hashes the circuits compute, a sparse Merkle tree for
//! the state, and a replay that checks a batch and yields every intermediate commitment.
//!
//! Everything here is plain Rust over Goldilocks; the circuits in [`crate::basic`] constrain
//! exactly these functions, and [`crate::final_proof::verify`] uses [`replay`] to recompute a
//! batch's public inputs from the batch file alone.

use std::collections::HashMap;

use plonky2::field::types::{Field, PrimeField64};
use plonky2::hash::hash_types::HashOut;
use plonky2::hash::poseidon::PoseidonHash;
use plonky2::plonk::config::Hasher;
use proofmesh_core::{BatchNumber, ProtocolVersion};

use crate::batch::{Account, Batch, StorageAccess, Transaction, BALANCE_BITS};
use crate::F;

/// A Poseidon digest: 4 Goldilocks elements.
pub type Digest = HashOut<F>;

/// The all-zero digest: the start of every running commitment.
pub const ZERO: Digest = HashOut { elements: [F::ZERO; 4] };

/// Converts 4 canonical u64s (as in the batch file) to a digest.
pub fn digest_from_u64s(v: [u64; 4]) -> Digest {
    HashOut { elements: v.map(F::from_canonical_u64) }
}

/// The 4 canonical u64s of a digest.
pub fn digest_to_u64s(d: Digest) -> [u64; 4] {
    d.elements.map(|e| e.to_canonical_u64())
}

/// `H(balance, nonce)`: the leaf of an account.
pub fn leaf_hash(a: Account) -> Digest {
    PoseidonHash::hash_no_pad(&[F::from_canonical_u64(a.balance), F::from_canonical_u32(a.nonce)])
}

/// `H(left || right)`: an inner node of the state tree.
pub fn node_hash(left: Digest, right: Digest) -> Digest {
    let mut v = left.elements.to_vec();
    v.extend_from_slice(&right.elements);
    PoseidonHash::hash_no_pad(&v)
}

/// The 4 elements a transaction contributes to the transaction commitment.
pub fn tx_elements(tx: &Transaction) -> [F; 4] {
    [
        F::from_canonical_u32(tx.from),
        F::from_canonical_u32(tx.to),
        F::from_canonical_u64(tx.amount),
        F::from_canonical_u32(tx.nonce),
    ]
}

/// One link of the transaction commitment: `H(c || from, to, amount, nonce)`.
pub fn tx_link(c: Digest, tx: &Transaction) -> Digest {
    let mut v = c.elements.to_vec();
    v.extend_from_slice(&tx_elements(tx));
    PoseidonHash::hash_no_pad(&v)
}

/// The 5 elements a write contributes to the access commitment.
pub fn access_elements(key: u32, old: Account, new: Account) -> [F; 5] {
    [
        F::from_canonical_u32(key),
        F::from_canonical_u64(old.balance),
        F::from_canonical_u32(old.nonce),
        F::from_canonical_u64(new.balance),
        F::from_canonical_u32(new.nonce),
    ]
}

/// One link of the access commitment: `H(c || key, old.balance, old.nonce, new.balance, new.nonce)`.
pub fn access_link(c: Digest, key: u32, old: Account, new: Account) -> Digest {
    let mut v = c.elements.to_vec();
    v.extend_from_slice(&access_elements(key, old, new));
    PoseidonHash::hash_no_pad(&v)
}

/// The root reached from `leaf` at `key` with `siblings` (level 0 first).
pub fn root_from_path(key: u32, leaf: Digest, siblings: &[[u64; 4]]) -> Digest {
    siblings.iter().enumerate().fold(leaf, |cur, (level, s)| {
        let s = digest_from_u64s(*s);
        if (key >> level) & 1 == 1 {
            node_hash(s, cur)
        } else {
            node_hash(cur, s)
        }
    })
}

/// A sparse Poseidon Merkle tree of accounts (empty leaves hold the zero account).
/// Used by the sample generator, which plays the L2 node.
#[derive(Debug, Clone)]
pub struct StateTree {
    depth: u8,
    /// `empty[l]`: the root of an empty subtree of height `l`.
    empty: Vec<Digest>,
    /// Non-empty nodes by `(level, index)`; level 0 holds leaves.
    nodes: HashMap<(u8, u64), Digest>,
    accounts: HashMap<u32, Account>,
}

impl StateTree {
    /// An empty tree of `depth` levels.
    pub fn new(depth: u8) -> Self {
        let mut empty = vec![leaf_hash(Account::default())];
        for l in 0..usize::from(depth) {
            empty.push(node_hash(empty[l], empty[l]));
        }
        StateTree { depth, empty, nodes: HashMap::new(), accounts: HashMap::new() }
    }

    fn node(&self, level: u8, index: u64) -> Digest {
        self.nodes.get(&(level, index)).copied().unwrap_or(self.empty[usize::from(level)])
    }

    /// The current root.
    pub fn root(&self) -> Digest {
        self.node(self.depth, 0)
    }

    /// The account at `key` (zero if never written).
    pub fn account(&self, key: u32) -> Account {
        self.accounts.get(&key).copied().unwrap_or_default()
    }

    /// The sibling path of `key`, level 0 first.
    pub fn path(&self, key: u32) -> Vec<[u64; 4]> {
        (0..self.depth)
            .map(|l| digest_to_u64s(self.node(l, (u64::from(key) >> l) ^ 1)))
            .collect()
    }

    /// Writes `value` at `key`, returning the access (with its witness against the old root).
    pub fn write(&mut self, key: u32, value: Account) -> StorageAccess {
        let access =
            StorageAccess { key, old: self.account(key), new: value, siblings: self.path(key) };
        self.accounts.insert(key, value);
        let mut cur = leaf_hash(value);
        let mut index = u64::from(key);
        self.nodes.insert((0, index), cur);
        for l in 0..self.depth {
            let sib = self.node(l, index ^ 1);
            cur = if index & 1 == 1 { node_hash(sib, cur) } else { node_hash(cur, sib) };
            index >>= 1;
            self.nodes.insert((l + 1, index), cur);
        }
        access
    }
}

/// A batch that does not execute: which transaction or access, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// An access's Merkle witness does not open to the current state root.
    #[error("storage access {index} (key {key}): Merkle path does not open to the current state root (the state root does not chain)")]
    BadWitness {
        /// Access index in the batch.
        index: usize,
        /// Its key.
        key: u32,
    },
    /// A transaction breaks the execution rules.
    #[error("transaction {index}: {problem}")]
    BadTransaction {
        /// Transaction index in the batch.
        index: usize,
        /// What is wrong.
        problem: String,
    },
    /// The tree depth of the batch differs from the geometry's.
    #[error("batch has a state tree of depth {batch}, the geometry expects {geometry}")]
    DepthMismatch {
        /// Depth in the batch header.
        batch: u8,
        /// Depth in the geometry.
        geometry: u8,
    },
}

/// The replayed batch: every running value, indexed by position (entry `i` is the value *before*
/// item `i`; the last entry is the final value).
#[derive(Debug, Clone)]
pub struct Replay {
    /// Transaction commitment before each transaction (`len = txs + 1`).
    pub tx_commitments: Vec<Digest>,
    /// Access commitment before each access (`len = accesses + 1`).
    pub access_commitments: Vec<Digest>,
    /// State root before each access (`len = accesses + 1`).
    pub roots: Vec<Digest>,
}

/// Executes a transaction natively: the sender's account after it, from the sender's before.
/// The receiver's side is [`credit`], applied to the receiver's account as it is *after* the
/// sender's write (so that a self-transfer sees its own debit).
pub fn debit(tx: &Transaction, sender: Account) -> Result<Account, String> {
    if sender.nonce != tx.nonce {
        return Err(format!("nonce {} but the sender's nonce is {}", tx.nonce, sender.nonce));
    }
    let balance = sender.balance.checked_sub(tx.amount).ok_or_else(|| {
        format!("amount {} exceeds the sender's balance {}", tx.amount, sender.balance)
    })?;
    let nonce = sender.nonce.checked_add(1).ok_or("sender nonce overflows")?;
    Ok(Account { balance, nonce })
}

/// The receiver's account after the transaction (see [`debit`]).
pub fn credit(tx: &Transaction, receiver: Account) -> Result<Account, String> {
    let balance = receiver.balance + tx.amount;
    if balance >> BALANCE_BITS != 0 {
        return Err(format!("receiver balance would reach {balance}, not below 2^56"));
    }
    Ok(Account { balance, nonce: receiver.nonce })
}

/// Checks a batch and computes its running commitments: every access's witness opens to the
/// state root of its time, and every write is exactly what its transaction does.
pub fn replay(batch: &Batch) -> Result<Replay, ReplayError> {
    let mut tx_commitments = vec![ZERO];
    for tx in &batch.transactions {
        tx_commitments.push(tx_link(*tx_commitments.last().expect("non-empty"), tx));
    }
    let mut roots = vec![digest_from_u64s(batch.prev_state_root)];
    let mut access_commitments = vec![ZERO];
    for (index, a) in batch.storage_accesses.iter().enumerate() {
        let root = *roots.last().expect("non-empty");
        if root_from_path(a.key, leaf_hash(a.old), &a.siblings) != root {
            return Err(ReplayError::BadWitness { index, key: a.key });
        }
        roots.push(root_from_path(a.key, leaf_hash(a.new), &a.siblings));
        access_commitments.push(access_link(*access_commitments.last().expect("non-empty"), a.key, a.old, a.new));
    }
    for (index, tx) in batch.transactions.iter().enumerate() {
        let bad = |problem: String| ReplayError::BadTransaction { index, problem };
        let (s, r) = (&batch.storage_accesses[2 * index], &batch.storage_accesses[2 * index + 1]);
        if s.key != tx.from || r.key != tx.to {
            return Err(bad(format!(
                "accesses touch keys {} and {}, the transaction moves {} -> {}",
                s.key, r.key, tx.from, tx.to
            )));
        }
        // The receiver's old value was proven against the root after the sender's write, so a
        // self-transfer reads the debited account here.
        if s.new != debit(tx, s.old).map_err(bad)? || r.new != credit(tx, r.old).map_err(bad)? {
            return Err(bad("the storage writes differ from the transaction's effect".into()));
        }
    }
    Ok(Replay { tx_commitments, access_commitments, roots })
}

/// What the final proof states about a batch: its public inputs, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicData {
    /// The batch's number.
    pub batch_number: BatchNumber,
    /// Its protocol version.
    pub protocol_version: ProtocolVersion,
    /// State root before the batch.
    pub prev_state_root: Digest,
    /// State root after the batch.
    pub new_state_root: Digest,
    /// Commitment to the batch's transactions (the running Poseidon chain over them).
    pub tx_commitment: Digest,
}

/// Number of public inputs of the scheduler and compression proofs.
pub const PUBLIC_DATA_LEN: usize = 18;

impl PublicData {
    /// Replays the batch and derives its public data.
    pub fn of(batch: &Batch) -> Result<PublicData, ReplayError> {
        let replay = replay(batch)?;
        Ok(Self::from_replay(batch, &replay))
    }

    /// The public data of an already replayed batch.
    pub fn from_replay(batch: &Batch, replay: &Replay) -> PublicData {
        PublicData {
            batch_number: batch.number,
            protocol_version: batch.protocol_version,
            prev_state_root: replay.roots[0],
            new_state_root: *replay.roots.last().expect("non-empty"),
            tx_commitment: *replay.tx_commitments.last().expect("non-empty"),
        }
    }

    /// `H(batch_number, protocol_version, prev_root, new_root, tx_commitment)`: the one digest an
    /// L1 contract would store.
    pub fn batch_commitment(&self) -> Digest {
        PoseidonHash::hash_no_pad(&self.head())
    }

    fn head(&self) -> Vec<F> {
        let mut v = vec![
            F::from_canonical_u32(self.batch_number.0),
            F::from_canonical_u32(self.protocol_version.packed()),
        ];
        for d in [self.prev_state_root, self.new_state_root, self.tx_commitment] {
            v.extend_from_slice(&d.elements);
        }
        v
    }

    /// The 18 public inputs: `batch_number, protocol_version (minor << 16 | patch),
    /// prev_state_root[4], new_state_root[4], tx_commitment[4], batch_commitment[4]`.
    pub fn to_public_inputs(&self) -> Vec<F> {
        let mut v = self.head();
        v.extend_from_slice(&self.batch_commitment().elements);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_paths_open_to_the_root() {
        let mut t = StateTree::new(8);
        let a = t.write(5, Account { balance: 10, nonce: 0 });
        assert_eq!(root_from_path(5, leaf_hash(a.new), &a.siblings), t.root());
        let b = t.write(200, Account { balance: 3, nonce: 1 });
        assert_eq!(root_from_path(200, leaf_hash(b.old), &b.siblings), root_from_path(5, leaf_hash(a.new), &a.siblings));
        assert_eq!(root_from_path(5, leaf_hash(t.account(5)), &t.path(5)), t.root());
    }
}
