//! The batch format (witness inputs), version 1: what the L2 node hands the prover for one batch.
//!
//! Little-endian throughout; the layout is documented field by field in `circuits/README.md`.
//! Parsing never panics: every failure is a [`BatchFormatError`] naming the field and the byte
//! offset where it was found.

use crate::{BatchNumber, ProtocolVersion};

/// The first four bytes of every batch file.
pub const BATCH_MAGIC: [u8; 4] = *b"PMBT";
/// The format version this code reads and writes.
pub const BATCH_FORMAT_VERSION: u16 = 1;
/// Balances and amounts are below 2^56, so that sums stay far below the Goldilocks modulus and
/// the main-VM circuit can range-check them.
pub const BALANCE_BITS: u32 = 56;
/// The Goldilocks modulus `2^64 - 2^32 + 1`: state-root elements must be below it.
pub const GOLDILOCKS_MODULUS: u64 = 0xFFFF_FFFF_0000_0001;
/// Upper bound on transactions per batch accepted by the parser (bounds memory on bad input).
pub const MAX_TXS: u32 = 1 << 20;

/// A transfer of `amount` from account `from` to account `to`. 20 bytes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transaction {
    /// Sender account (a leaf index of the state tree).
    pub from: u32,
    /// Receiver account (may equal `from`).
    pub to: u32,
    /// Amount, `< 2^56`.
    pub amount: u64,
    /// The sender's nonce before this transaction.
    pub nonce: u32,
}

/// An account's value in a state-tree leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Account {
    /// Balance, `< 2^56`.
    pub balance: u64,
    /// Transactions sent so far.
    pub nonce: u32,
}

/// One write to the state tree, with the Merkle witness to apply it: the leaf `key` holds `old`
/// before and `new` after; `siblings[i]` is the sibling at level `i` (0 = next to the leaf) of the
/// path, valid against the root *before* this access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageAccess {
    /// Leaf index, `< 2^state_tree_depth`.
    pub key: u32,
    /// Value before the write.
    pub old: Account,
    /// Value after the write.
    pub new: Account,
    /// `state_tree_depth` sibling hashes, 4 field elements each.
    pub siblings: Vec<[u64; 4]>,
}

/// One batch's witness inputs. Transaction `i` makes storage accesses `2i` (sender) and `2i + 1`
/// (receiver), in that order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The batch's number.
    pub number: BatchNumber,
    /// The protocol version it is proven under.
    pub protocol_version: ProtocolVersion,
    /// Depth of the state tree.
    pub state_tree_depth: u8,
    /// The state root before the batch (4 Goldilocks elements).
    pub prev_state_root: [u64; 4],
    /// The transactions, in execution order.
    pub transactions: Vec<Transaction>,
    /// Two accesses per transaction.
    pub storage_accesses: Vec<StorageAccess>,
}

/// Why bytes are not a valid batch: the field, its byte offset, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("batch format: field `{field}` at byte {offset}: {problem}")]
pub struct BatchFormatError {
    /// The field being read, e.g. `transactions[3].amount`.
    pub field: String,
    /// Byte offset of the field in the file.
    pub offset: usize,
    /// What is wrong with it.
    pub problem: String,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, field: impl Into<String>, problem: impl Into<String>) -> BatchFormatError {
        BatchFormatError { field: field.into(), offset: self.pos, problem: problem.into() }
    }

    fn take<const N: usize>(&mut self, field: &dyn Fn() -> String) -> Result<[u8; N], BatchFormatError> {
        let end = self.pos + N;
        let Some(slice) = self.bytes.get(self.pos..end) else {
            return Err(self.err(
                field(),
                format!("truncated: need {N} bytes, {} left", self.bytes.len() - self.pos),
            ));
        };
        self.pos = end;
        Ok(slice.try_into().expect("slice has length N"))
    }

    fn u8(&mut self, field: &dyn Fn() -> String) -> Result<u8, BatchFormatError> {
        Ok(self.take::<1>(field)?[0])
    }
    fn u16(&mut self, field: &dyn Fn() -> String) -> Result<u16, BatchFormatError> {
        Ok(u16::from_le_bytes(self.take(field)?))
    }
    fn u32(&mut self, field: &dyn Fn() -> String) -> Result<u32, BatchFormatError> {
        Ok(u32::from_le_bytes(self.take(field)?))
    }
    fn u64(&mut self, field: &dyn Fn() -> String) -> Result<u64, BatchFormatError> {
        Ok(u64::from_le_bytes(self.take(field)?))
    }

    /// A u64 that must be below `bound`, checked at the field's own offset.
    fn bounded(&mut self, field: &dyn Fn() -> String, bound: u64, what: &str) -> Result<u64, BatchFormatError> {
        let at = self.pos;
        let v = self.u64(field)?;
        if v >= bound {
            return Err(BatchFormatError {
                field: field(),
                offset: at,
                problem: format!("{v} is not below {what}"),
            });
        }
        Ok(v)
    }

    fn hash(&mut self, field: &dyn Fn() -> String) -> Result<[u64; 4], BatchFormatError> {
        let mut h = [0u64; 4];
        for (i, e) in h.iter_mut().enumerate() {
            *e = self.bounded(&|| format!("{}[{i}]", field()), GOLDILOCKS_MODULUS, "the Goldilocks modulus")?;
        }
        Ok(h)
    }

    fn account(&mut self, field: &dyn Fn() -> String) -> Result<Account, BatchFormatError> {
        let balance =
            self.bounded(&|| format!("{}.balance", field()), 1 << BALANCE_BITS, "2^56")?;
        let nonce = self.u32(&|| format!("{}.nonce", field()))?;
        Ok(Account { balance, nonce })
    }
}

impl Batch {
    /// Parses a batch file. Every field is bounds-checked; counts are checked against the bytes
    /// that remain before anything is allocated.
    ///
    /// Errors: [`BatchFormatError`] naming the first bad field and its offset.
    pub fn from_bytes(bytes: &[u8]) -> Result<Batch, BatchFormatError> {
        let mut r = Reader { bytes, pos: 0 };
        let magic = r.take::<4>(&|| "magic".into())?;
        if magic != BATCH_MAGIC {
            r.pos = 0;
            return Err(r.err("magic", format!("expected \"PMBT\", found {magic:02x?}")));
        }
        let at = r.pos;
        let version = r.u16(&|| "format_version".into())?;
        if version != BATCH_FORMAT_VERSION {
            r.pos = at;
            return Err(r.err("format_version", format!("unsupported version {version} (this build reads 1)")));
        }
        let minor = r.u16(&|| "protocol_version.minor".into())?;
        let patch = r.u16(&|| "protocol_version.patch".into())?;
        let number = BatchNumber(r.u32(&|| "batch_number".into())?);
        let at = r.pos;
        let depth = r.u8(&|| "state_tree_depth".into())?;
        if !(4..=32).contains(&depth) {
            r.pos = at;
            return Err(r.err("state_tree_depth", format!("{depth} is outside 4..=32")));
        }
        let at = r.pos;
        if r.u8(&|| "reserved".into())? != 0 {
            r.pos = at;
            return Err(r.err("reserved", "must be 0"));
        }
        let prev_state_root = r.hash(&|| "prev_state_root".into())?;

        let at = r.pos;
        let tx_count = r.u32(&|| "tx_count".into())?;
        let remaining = bytes.len() - r.pos;
        if tx_count > MAX_TXS || (tx_count as usize) * 20 > remaining {
            r.pos = at;
            return Err(r.err(
                "tx_count",
                format!("{tx_count} transactions cannot fit in the {remaining} bytes left (max {MAX_TXS})"),
            ));
        }
        let mut transactions = Vec::with_capacity(tx_count as usize);
        for i in 0..tx_count as usize {
            let from = r.u32(&|| format!("transactions[{i}].from"))?;
            let to = r.u32(&|| format!("transactions[{i}].to"))?;
            let amount = r.bounded(&|| format!("transactions[{i}].amount"), 1 << BALANCE_BITS, "2^56")?;
            let nonce = r.u32(&|| format!("transactions[{i}].nonce"))?;
            transactions.push(Transaction { from, to, amount, nonce });
        }

        let at = r.pos;
        let access_count = r.u32(&|| "access_count".into())?;
        if u64::from(access_count) != 2 * u64::from(tx_count) {
            r.pos = at;
            return Err(r.err("access_count", format!("{access_count}, expected 2 per transaction ({})", 2 * tx_count)));
        }
        let access_size = 4 + 2 * 12 + usize::from(depth) * 32;
        let remaining = bytes.len() - r.pos;
        if (access_count as usize) * access_size > remaining {
            r.pos = at;
            return Err(r.err(
                "access_count",
                format!("{access_count} accesses of {access_size} bytes cannot fit in the {remaining} bytes left"),
            ));
        }
        let mut storage_accesses = Vec::with_capacity(access_count as usize);
        for i in 0..access_count as usize {
            let kat = r.pos;
            let key = r.u32(&|| format!("storage_accesses[{i}].key"))?;
            if depth < 32 && key >> depth != 0 {
                r.pos = kat;
                return Err(r.err(format!("storage_accesses[{i}].key"), format!("{key} is not below 2^{depth}")));
            }
            let old = r.account(&|| format!("storage_accesses[{i}].old"))?;
            let new = r.account(&|| format!("storage_accesses[{i}].new"))?;
            let mut siblings = Vec::with_capacity(depth.into());
            for l in 0..usize::from(depth) {
                siblings.push(r.hash(&|| format!("storage_accesses[{i}].siblings[{l}]"))?);
            }
            storage_accesses.push(StorageAccess { key, old, new, siblings });
        }
        if r.pos != bytes.len() {
            return Err(r.err("end", format!("{} trailing bytes after the last access", bytes.len() - r.pos)));
        }
        Ok(Batch {
            number,
            protocol_version: ProtocolVersion { minor, patch },
            state_tree_depth: depth,
            prev_state_root,
            transactions,
            storage_accesses,
        })
    }

    /// Serializes the batch in format version 1 (the inverse of [`Batch::from_bytes`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&BATCH_MAGIC);
        out.extend_from_slice(&BATCH_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.protocol_version.minor.to_le_bytes());
        out.extend_from_slice(&self.protocol_version.patch.to_le_bytes());
        out.extend_from_slice(&self.number.0.to_le_bytes());
        out.push(self.state_tree_depth);
        out.push(0);
        self.prev_state_root.iter().for_each(|e| out.extend_from_slice(&e.to_le_bytes()));
        out.extend_from_slice(&(self.transactions.len() as u32).to_le_bytes());
        for tx in &self.transactions {
            out.extend_from_slice(&tx.from.to_le_bytes());
            out.extend_from_slice(&tx.to.to_le_bytes());
            out.extend_from_slice(&tx.amount.to_le_bytes());
            out.extend_from_slice(&tx.nonce.to_le_bytes());
        }
        out.extend_from_slice(&(self.storage_accesses.len() as u32).to_le_bytes());
        for a in &self.storage_accesses {
            out.extend_from_slice(&a.key.to_le_bytes());
            for acc in [a.old, a.new] {
                out.extend_from_slice(&acc.balance.to_le_bytes());
                out.extend_from_slice(&acc.nonce.to_le_bytes());
            }
            for s in &a.siblings {
                s.iter().for_each(|e| out.extend_from_slice(&e.to_le_bytes()));
            }
        }
        out
    }
}
