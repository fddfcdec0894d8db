//! Geometry: how a batch is cut into basic circuits and how their proofs are aggregated.
//!
//! The geometry is part of what a circuit *is*: setup data is cached under a key that includes it
//! ([`Geometry::cache_key`]), and the final proof's header records it so that `verify` can rebuild
//! the exact verifier data. zkSync Era keeps the same kind of numbers in its `geometry_config`
//! (cycles per circuit, `leaf_fan_in`, `node_fan_in`).

use std::fmt;

/// How many items each basic circuit covers and how many proofs each aggregation circuit takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Depth of the Poseidon sparse Merkle tree holding the state (2^depth account slots).
    pub state_tree_depth: u8,
    /// Transactions per transaction-hasher circuit (circuit id 1, the light one).
    pub tx_chunk: u16,
    /// Transactions per main-VM circuit (circuit id 2).
    pub vm_chunk: u16,
    /// Storage accesses per storage-application circuit (circuit id 3, the heavy one).
    pub storage_chunk: u16,
    /// Basic proofs per leaf aggregation circuit (round 1).
    pub leaf_fan_in: u8,
    /// Leaf or node proofs per node aggregation circuit (round 2).
    pub node_fan_in: u8,
    /// Node levels the recursion tip accepts (depths `0..max_node_depth`). Bounds the batch:
    /// at most `leaf_fan_in * node_fan_in^max_node_depth` basic circuits per type.
    pub max_node_depth: u8,
}

/// A geometry outside the bounds the circuits are built for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    /// A field is outside its allowed range.
    #[error("geometry field `{field}` = {value} is outside {min}..={max}")]
    OutOfRange {
        /// The field's name.
        field: &'static str,
        /// Its value.
        value: u64,
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
    },
    /// The batch needs more basic circuits of one type than the node levels can aggregate.
    #[error(
        "{basic} basic circuits of one type need more than {max_node_depth} node levels \
         (capacity {capacity} with this geometry)"
    )]
    TooManyCircuits {
        /// Basic circuits of the type.
        basic: usize,
        /// The geometry's `max_node_depth`.
        max_node_depth: u8,
        /// Basic circuits of one type the geometry can aggregate.
        capacity: usize,
    },
}

/// The aggregation tree of one circuit type: how many proofs each level has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregationPlan {
    /// Basic proofs (round 0).
    pub basic: usize,
    /// Leaf proofs (round 1): `ceil(basic / leaf_fan_in)`.
    pub leaves: usize,
    /// Node proofs per depth (round 2); never empty, the last entry is 1.
    pub nodes: Vec<usize>,
}

impl Default for Geometry {
    /// The production default: each job proves in seconds on a CPU core pair and in under 2 GiB.
    fn default() -> Self {
        Geometry {
            state_tree_depth: 16,
            tx_chunk: 256,
            vm_chunk: 32,
            storage_chunk: 64,
            leaf_fan_in: 4,
            node_fan_in: 4,
            max_node_depth: 3,
        }
    }
}

impl Geometry {
    /// A small geometry for tests and demos: every circuit is small, fan-ins are 2.
    pub fn small() -> Self {
        Geometry {
            state_tree_depth: 16,
            tx_chunk: 16,
            vm_chunk: 4,
            storage_chunk: 8,
            leaf_fan_in: 2,
            node_fan_in: 2,
            max_node_depth: 2,
        }
    }

    /// Checks every field against the bounds the circuits support (so that a geometry read from
    /// an untrusted proof header cannot make the verifier build a huge circuit).
    pub fn validate(&self) -> Result<(), GeometryError> {
        let check = |field, value: u64, min, max| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(GeometryError::OutOfRange { field, value, min, max })
            }
        };
        check("state_tree_depth", self.state_tree_depth.into(), 4, 32)?;
        check("tx_chunk", self.tx_chunk.into(), 1, 1024)?;
        check("vm_chunk", self.vm_chunk.into(), 1, 256)?;
        check("storage_chunk", self.storage_chunk.into(), 1, 256)?;
        check("leaf_fan_in", self.leaf_fan_in.into(), 1, 8)?;
        check("node_fan_in", self.node_fan_in.into(), 2, 8)?;
        check("max_node_depth", self.max_node_depth.into(), 1, 6)
    }

    /// Basic circuits of one type the geometry can aggregate.
    pub fn capacity(&self) -> usize {
        usize::from(self.leaf_fan_in) * usize::from(self.node_fan_in).pow(self.max_node_depth.into())
    }

    /// The aggregation tree for `basic` basic circuits of one type (at least one: an empty batch
    /// still proves one all-padding circuit per type). Node aggregation always runs at least
    /// once (depth 0), as in zkSync Era, so the recursion tip only ever sees node proofs.
    pub fn aggregation_plan(&self, basic: usize) -> Result<AggregationPlan, GeometryError> {
        let basic = basic.max(1);
        if basic > self.capacity() {
            return Err(GeometryError::TooManyCircuits {
                basic,
                max_node_depth: self.max_node_depth,
                capacity: self.capacity(),
            });
        }
        let leaves = basic.div_ceil(self.leaf_fan_in.into());
        let mut nodes = vec![leaves.div_ceil(self.node_fan_in.into())];
        while *nodes.last().expect("nodes starts non-empty") > 1 {
            let below = *nodes.last().expect("non-empty");
            nodes.push(below.div_ceil(self.node_fan_in.into()));
        }
        Ok(AggregationPlan { basic, leaves, nodes })
    }

    /// A file-name-safe string naming this geometry, part of every setup-data cache key.
    pub fn cache_key(&self) -> String {
        format!(
            "d{}-t{}-v{}-s{}-l{}-n{}-m{}",
            self.state_tree_depth,
            self.tx_chunk,
            self.vm_chunk,
            self.storage_chunk,
            self.leaf_fan_in,
            self.node_fan_in,
            self.max_node_depth
        )
    }
}

impl fmt::Display for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.cache_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_iterates_node_levels_until_one_proof() {
        let g = Geometry::default();
        let p = g.aggregation_plan(70).unwrap();
        assert_eq!(p.leaves, 18);
        assert_eq!(p.nodes, vec![5, 2, 1]);
        assert_eq!(g.aggregation_plan(1).unwrap().nodes, vec![1]);
        assert_eq!(g.aggregation_plan(0).unwrap().basic, 1);
    }

    #[test]
    fn plan_refuses_batches_beyond_capacity() {
        let g = Geometry::small();
        assert_eq!(g.capacity(), 8);
        assert!(g.aggregation_plan(8).is_ok());
        assert!(matches!(
            g.aggregation_plan(9),
            Err(GeometryError::TooManyCircuits { basic: 9, .. })
        ));
    }

    #[test]
    fn validate_names_the_bad_field() {
        let g = Geometry { leaf_fan_in: 0, ..Geometry::default() };
        let e = g.validate().unwrap_err();
        assert!(e.to_string().contains("leaf_fan_in"), "{e}");
        Geometry::default().validate().unwrap();
        Geometry::small().validate().unwrap();
    }
}
