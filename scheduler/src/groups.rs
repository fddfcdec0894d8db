//! Prover groups: which `(aggregation_round, circuit_id)` pairs the workers of a group take, read
//! from a TOML file (`--prover-groups`), in the shape of zkSync Era's `fri_prover_group` config:
//!
//! ```toml
//! [[group]]
//! id = 0
//! circuits = [{ aggregation_round = 0, circuit_id = 1 }, { aggregation_round = 1, circuit_id = 1 }]
//!
//! [[group]]
//! id = 1
//! circuits = [{ aggregation_round = 4, circuit_id = 0 }]
//! ```
//!
//! Groups are for proving: a WVG or prover registered with a group is leased only its pairs (a
//! WVG and its prover: the pairs both take); one without takes every pair. Witness generators and
//! compressors take no group. Era falls back silently to all pairs for an
//! unknown group; here an unknown group is refused at registration, and pairs no group covers
//! are reported when the scheduler starts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use proofmesh_core::CircuitId;


/// A pair packed as `aggregation_round * 256 + circuit_id`, as the lease query compares it.
pub type PackedPair = i32;

/// Packs a pair.
pub fn pack(round: u8, circuit_id: u8) -> PackedPair {
    i32::from(round) * 256 + i32::from(circuit_id)
}

/// Packs pairs as the API gives them; pairs out of range (above 255) are dropped.
pub fn pack_all(pairs: &[proofmesh_proto::v1::CircuitPair]) -> Vec<PackedPair> {
    pairs.iter().filter_map(|p| Some(pack(u8::try_from(p.aggregation_round).ok()?, u8::try_from(p.circuit_id).ok()?))).collect()
}

/// A packed pair as the API gives it.
pub fn unpack(p: PackedPair) -> proofmesh_proto::v1::CircuitPair {
    proofmesh_proto::v1::CircuitPair { aggregation_round: (p >> 8) as u32, circuit_id: (p & 0xff) as u32 }
}

/// The groups of a `--prover-groups` file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProverGroups {
    groups: BTreeMap<u32, BTreeSet<(u8, u8)>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    group: Vec<GroupEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupEntry {
    id: u32,
    circuits: Vec<PairEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PairEntry {
    aggregation_round: u8,
    circuit_id: u8,
}

/// A `--prover-groups` file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GroupsError {
    /// It cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// It is not valid TOML of the expected shape.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (line, column, field).
        message: String,
    },
    /// A group id twice, a group without pairs, or a round out of range.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl ProverGroups {
    /// Reads and checks a groups file. Errors: unreadable, not TOML of the shape above, a group
    /// id defined twice, a group with no pairs, an aggregation round above 4.
    pub fn load(path: &Path) -> Result<Self, GroupsError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| GroupsError::Read { path: name.clone(), source })?;
        Self::parse(&text).map_err(|e| match e {
            GroupsError::Parse { message, .. } => GroupsError::Parse { path: name.clone(), message },
            GroupsError::Invalid { message, .. } => GroupsError::Invalid { path: name.clone(), message },
            other => other,
        })
    }

    /// Parses the text of a groups file (see [`ProverGroups::load`]).
    pub fn parse(text: &str) -> Result<Self, GroupsError> {
        let file: File = toml::from_str(text).map_err(|e| GroupsError::Parse { path: String::new(), message: e.to_string() })?;
        let invalid = |message: String| GroupsError::Invalid { path: String::new(), message };
        let mut groups = BTreeMap::new();
        for g in file.group {
            if g.circuits.is_empty() {
                return Err(invalid(format!("group {} has no circuits", g.id)));
            }
            let mut pairs = BTreeSet::new();
            for p in g.circuits {
                if p.aggregation_round > 4 {
                    return Err(invalid(format!("group {}: aggregation_round {} is not 0..=4", g.id, p.aggregation_round)));
                }
                pairs.insert((p.aggregation_round, p.circuit_id));
            }
            if groups.insert(g.id, pairs).is_some() {
                return Err(invalid(format!("group {} is defined twice", g.id)));
            }
        }
        Ok(ProverGroups { groups })
    }

    /// The packed pairs of `group`, or `None` if no such group.
    pub fn pairs(&self, group: u32) -> Option<Vec<PackedPair>> {
        self.groups.get(&group).map(|pairs| pairs.iter().map(|&(r, c)| pack(r, c)).collect())
    }

    /// The group ids, ascending.
    pub fn ids(&self) -> Vec<u32> {
        self.groups.keys().copied().collect()
    }

    /// The proving pairs a batch can have that no group covers: workers with a group never take
    /// them, only workers without one.
    pub fn uncovered(&self) -> Vec<(u8, u8)> {
        let covered: BTreeSet<(u8, u8)> = self.groups.values().flatten().copied().collect();
        every_pair().into_iter().filter(|p| !covered.contains(p)).collect()
    }
}

/// Every `(aggregation_round, circuit_id)` a batch's proving jobs can have: rounds 0 to 2 per
/// basic circuit type, the recursion tip and the scheduler with id 0.
pub fn every_pair() -> Vec<(u8, u8)> {
    let mut pairs: Vec<(u8, u8)> = (0..=2).flat_map(|r| CircuitId::BASIC.map(|c| (r, c.0))).collect();
    pairs.extend([(3, 0), (4, 0)]);
    pairs
}

/// The pairs two workers both take (empty means all): what a WVG and its prover can be leased.
/// `None` if they have none in common.
pub fn intersect(a: &[PackedPair], b: &[PackedPair]) -> Option<Vec<PackedPair>> {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => Some(b.to_vec()),
        (_, true) => Some(a.to_vec()),
        _ => {
            let both: Vec<PackedPair> = a.iter().copied().filter(|p| b.contains(p)).collect();
            (!both.is_empty()).then_some(both)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_era_shaped_groups_and_reports_what_no_group_covers() {
        let g = ProverGroups::parse(
            "[[group]]\nid = 0\ncircuits = [{ aggregation_round = 0, circuit_id = 1 }, { aggregation_round = 1, circuit_id = 1 }]\n\
             [[group]]\nid = 7\ncircuits = [{ aggregation_round = 4, circuit_id = 0 }]\n",
        )
        .unwrap();
        assert_eq!(g.ids(), vec![0, 7]);
        assert_eq!(g.pairs(0), Some(vec![pack(0, 1), pack(1, 1)]));
        assert_eq!(g.pairs(3), None);
        let uncovered = g.uncovered();
        assert!(uncovered.contains(&(0, 2)) && uncovered.contains(&(3, 0)) && !uncovered.contains(&(4, 0)));
        assert_eq!(uncovered.len(), every_pair().len() - 3);
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let err = |t: &str| ProverGroups::parse(t).unwrap_err().to_string();
        assert!(err("[[group]]\nid = 1\ncircuits = []\n").contains("group 1 has no circuits"));
        assert!(err("[[group]]\nid = 1\ncircuits = [{ aggregation_round = 9, circuit_id = 0 }]\n").contains("aggregation_round 9"));
        let twice = "[[group]]\nid = 1\ncircuits = [{ aggregation_round = 0, circuit_id = 1 }]\n";
        assert!(err(&format!("{twice}{twice}")).contains("defined twice"));
        assert!(err("[[group]]\nid = 1\ncircuit = []\n").contains("circuit"), "a misspelt key is named");
        assert!(err("not toml at all").contains("expected"));
    }

    #[test]
    fn a_wvg_and_its_prover_take_the_pairs_both_take() {
        assert_eq!(intersect(&[], &[]), Some(vec![]));
        assert_eq!(intersect(&[1, 2], &[]), Some(vec![1, 2]));
        assert_eq!(intersect(&[1, 2], &[2, 3]), Some(vec![2]));
        assert_eq!(intersect(&[1], &[3]), None);
    }
}
