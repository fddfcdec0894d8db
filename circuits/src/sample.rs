//! Sample batches: plays the L2 node for `gen-batch`, tests and benchmarks.

use proofmesh_core::{BatchNumber, ProtocolVersion};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::batch::{Account, Batch, Transaction};
use crate::state::{credit, debit, digest_to_u64s, StateTree};

/// Accounts funded at genesis.
const FUNDED_ACCOUNTS: u32 = 64;
/// Their starting balance.
const GENESIS_BALANCE: u64 = 1_000_000_000;

/// Generates consecutive batches `first_number, first_number + 1, ...` with `tx_counts[i]`
/// transactions each, over a state tree of `depth` levels whose genesis funds 64 accounts.
/// Batch `i + 1` starts from the state root batch `i` ends at. Deterministic in `seed`.
pub fn generate_batches(
    seed: u64,
    depth: u8,
    tx_counts: &[usize],
    first_number: u32,
) -> anyhow::Result<Vec<Batch>> {
    anyhow::ensure!((4..=32).contains(&depth), "state tree depth {depth} is outside 4..=32");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tree = StateTree::new(depth);
    let key_space = if depth >= 32 { u32::MAX } else { (1u32 << depth) - 1 };
    let accounts: Vec<u32> = (0..FUNDED_ACCOUNTS).map(|_| rng.gen_range(0..=key_space)).collect();
    for &a in &accounts {
        tree.write(a, Account { balance: GENESIS_BALANCE, nonce: 0 });
    }
    let mut batches = Vec::new();
    for (i, &n) in tx_counts.iter().enumerate() {
        let prev_state_root = digest_to_u64s(tree.root());
        let mut transactions = Vec::with_capacity(n);
        let mut storage_accesses = Vec::with_capacity(2 * n);
        for _ in 0..n {
            let from = accounts[rng.gen_range(0..accounts.len())];
            // One in eight transfers goes to a fresh account, one in 32 to the sender itself.
            let to = match rng.gen_range(0..32) {
                0 => from,
                1..=4 => rng.gen_range(0..=key_space),
                _ => accounts[rng.gen_range(0..accounts.len())],
            };
            let sender = tree.account(from);
            let tx = Transaction {
                from,
                to,
                amount: rng.gen_range(0..=sender.balance / 8),
                nonce: sender.nonce,
            };
            let new_sender = debit(&tx, sender).map_err(anyhow::Error::msg)?;
            storage_accesses.push(tree.write(from, new_sender));
            let new_receiver = credit(&tx, tree.account(to)).map_err(anyhow::Error::msg)?;
            storage_accesses.push(tree.write(to, new_receiver));
            transactions.push(tx);
        }
        batches.push(Batch {
            number: BatchNumber(first_number + i as u32),
            protocol_version: ProtocolVersion::CURRENT,
            state_tree_depth: depth,
            prev_state_root,
            transactions,
            storage_accesses,
        });
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{replay, PublicData};

    #[test]
    fn generated_batches_replay_and_chain() {
        let batches = generate_batches(3, 16, &[20, 33], 1).unwrap();
        let first = PublicData::of(&batches[0]).unwrap();
        let second = PublicData::of(&batches[1]).unwrap();
        assert_eq!(first.new_state_root, second.prev_state_root);
        assert_ne!(first.prev_state_root, first.new_state_root);
        assert_eq!(replay(&batches[1]).unwrap().roots.len(), 67);
    }

    #[test]
    fn a_batch_that_does_not_chain_is_refused() {
        let mut batches = generate_batches(3, 16, &[5, 5], 1).unwrap();
        batches[1].prev_state_root = batches[0].prev_state_root;
        let e = replay(&batches[1]).unwrap_err();
        assert!(e.to_string().contains("does not chain"), "{e}");
    }

    #[test]
    fn a_write_that_is_not_the_transactions_effect_is_refused() {
        let mut batch = generate_batches(3, 16, &[5], 1).unwrap().remove(0);
        batch.transactions[2].amount += 1;
        let e = replay(&batch).unwrap_err();
        assert!(e.to_string().starts_with("transaction 2"), "{e}");
    }
}
