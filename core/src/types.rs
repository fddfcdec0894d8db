//! Identifiers: batch numbers, aggregation rounds, circuit ids, protocol versions.

use std::fmt;

/// The number of an L2 batch, as sealed by the rollup's node.
///
/// 32 bits, as zkSync Era's `L1BatchNumber`: it is exposed as one Goldilocks field element in the
/// final proof's public inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BatchNumber(pub u32);

impl fmt::Display for BatchNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The semantic protocol version a batch is proven under (`minor.patch`; the major is 0 as in
/// zkSync Era's `ProtocolSemanticVersion`). Circuits and setup data are keyed by it, so old and new
/// provers can run side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtocolVersion {
    /// Changes with the circuits (new verification keys).
    pub minor: u16,
    /// Changes without touching the circuits.
    pub patch: u16,
}

impl ProtocolVersion {
    /// The version the reference circuits of this release implement.
    pub const CURRENT: ProtocolVersion = ProtocolVersion { minor: 1, patch: 0 };

    /// `minor << 16 | patch`: the single field element the scheduler circuit exposes.
    pub fn packed(self) -> u32 {
        (u32::from(self.minor) << 16) | u32::from(self.patch)
    }

    /// The inverse of [`ProtocolVersion::packed`].
    pub fn from_packed(packed: u32) -> Self {
        ProtocolVersion { minor: (packed >> 16) as u16, patch: packed as u16 }
    }
}

impl std::str::FromStr for ProtocolVersion {
    type Err = String;

    /// `0.MINOR.PATCH` (as [`fmt::Display`] writes it) or `MINOR.PATCH`, each below 65536.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        let (minor, patch) = match parts.as_slice() {
            ["0", m, p] | [m, p] => (*m, *p),
            _ => return Err(format!("protocol version {s:?}: expected 0.MINOR.PATCH (the major is 0), e.g. 0.1.0")),
        };
        let num = |x: &str| x.parse::<u16>().map_err(|_| format!("protocol version {s:?}: {x:?} is not a number below 65536"));
        Ok(ProtocolVersion { minor: num(minor)?, patch: num(patch)? })
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0.{}.{}", self.minor, self.patch)
    }
}

/// A circuit type within a round. In round 0 it names the basic circuit type (what aspect of the
/// batch the circuit checks); in rounds 1 and 2 the basic type being aggregated; rounds 3 and 4
/// and compression have a single circuit, id 0 by convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CircuitId(pub u8);

impl CircuitId {
    /// The basic circuit types' ids (round 0, and the type aggregated in rounds 1 and 2), for
    /// crates that schedule circuits without knowing them (`proofmesh_circuits::basic::BasicCircuit`
    /// defines them; a test there keeps the two equal).
    pub const BASIC: [CircuitId; 3] = [CircuitId(1), CircuitId(2), CircuitId(3)];
}

impl fmt::Display for CircuitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The five aggregation rounds of DESIGN.md section 1. Compression follows round 4 and is a stage
/// of its own, not a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AggregationRound {
    /// Round 0: basic circuits over the batch's witness inputs.
    BasicCircuits = 0,
    /// Round 1: leaf aggregation of up to `leaf_fan_in` basic proofs of one circuit type.
    LeafAggregation = 1,
    /// Round 2: node aggregation, iterated by depth until one proof per circuit type remains.
    NodeAggregation = 2,
    /// Round 3: the recursion tip over the per-type proofs.
    RecursionTip = 3,
    /// Round 4: the scheduler, binding the tip proof to the batch's public data.
    Scheduler = 4,
}

/// A round number outside 0..=4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown aggregation round {0} (expected 0..=4)")]
pub struct UnknownRound(pub u8);

impl AggregationRound {
    /// All rounds in proving order.
    pub const ALL: [AggregationRound; 5] = [
        Self::BasicCircuits,
        Self::LeafAggregation,
        Self::NodeAggregation,
        Self::RecursionTip,
        Self::Scheduler,
    ];

    /// The short name used in logs, metrics and file names.
    pub fn name(self) -> &'static str {
        match self {
            Self::BasicCircuits => "basic",
            Self::LeafAggregation => "leaf",
            Self::NodeAggregation => "node",
            Self::RecursionTip => "recursion_tip",
            Self::Scheduler => "scheduler",
        }
    }
}

impl TryFrom<u8> for AggregationRound {
    type Error = UnknownRound;
    fn try_from(v: u8) -> Result<Self, UnknownRound> {
        Self::ALL.get(usize::from(v)).copied().ok_or(UnknownRound(v))
    }
}

impl fmt::Display for AggregationRound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_round_trip_through_their_number() {
        for r in AggregationRound::ALL {
            assert_eq!(AggregationRound::try_from(r as u8), Ok(r));
        }
        assert_eq!(AggregationRound::try_from(5), Err(UnknownRound(5)));
    }

    #[test]
    fn protocol_version_packs_minor_over_patch() {
        let v = ProtocolVersion { minor: 3, patch: 7 };
        assert_eq!(v.packed(), 0x0003_0007);
        assert_eq!(v.to_string(), "0.3.7");
    }
}
