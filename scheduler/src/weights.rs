//! Job weights: the peak memory, in MiB, of proving (and compressing) each `(aggregation_round,
//! circuit_id)`, read from a TOML file (`--job-weights`) that `make bench` writes from its
//! per-circuit measurements (`proofmesh-circuits bench --weights-out`):
//!
//! ```toml
//! # peak process memory while synthesizing the witness vector and proving, MiB
//! geometry = "default"
//!
//! [[weight]]
//! aggregation_round = 0
//! circuit_id = 1
//! peak_mib = 812
//! ```
//!
//! A job is given its pair's weight when it is planned (`jobs.weight_mib`); a pair the file does
//! not list, and every witness-generation job, weighs 0. Workers declare a memory budget
//! (`--memory-budget-mib`); the lease statement never leases a worker (or the prover matched with
//! a WVG) jobs whose weights sum past its budget. This is zkSync Era's heavy/light WVG split made
//! continuous: Era runs a fixed 13 light + 3 heavy WVGs in 60 GB.

use std::collections::BTreeMap;
use std::path::Path;

use crate::graph::JobKind;

/// The weights of a `--job-weights` file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobWeights {
    by_pair: BTreeMap<(u8, u8), i32>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// Informational: the geometry the figures were measured at.
    #[allow(dead_code)]
    geometry: Option<String>,
    #[serde(default)]
    weight: Vec<Entry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    aggregation_round: u8,
    circuit_id: u8,
    peak_mib: u32,
}

/// A `--job-weights` file that cannot be used: unreadable, not TOML of this shape (the parser's
/// line and field), a round above 5, a pair twice, or a weight above 2^31 MiB.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct WeightsError {
    /// The file.
    pub path: String,
    /// Why.
    pub message: String,
}

impl JobWeights {
    /// Reads a weights file.
    pub fn load(path: &Path) -> Result<Self, WeightsError> {
        let err = |message: String| WeightsError { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::parse(&text).map_err(err)
    }

    /// Parses a weights file's text. Errors: as [`WeightsError`]'s message.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut by_pair = BTreeMap::new();
        for w in file.weight {
            if w.aggregation_round > 5 {
                return Err(format!("aggregation_round {} is not 0..=5 (5: compression)", w.aggregation_round));
            }
            let mib = i32::try_from(w.peak_mib).map_err(|_| format!("peak_mib {} is too large", w.peak_mib))?;
            if by_pair.insert((w.aggregation_round, w.circuit_id), mib).is_some() {
                return Err(format!("({}, {}) is listed twice", w.aggregation_round, w.circuit_id));
            }
        }
        Ok(JobWeights { by_pair })
    }

    /// The weight of a job, MiB: its pair's for proving and compression, 0 for witness generation
    /// and for pairs the file does not list.
    pub fn of(&self, kind: JobKind, round: u8, circuit_id: u8) -> i32 {
        match kind {
            JobKind::WitnessGeneration => 0,
            JobKind::Proving | JobKind::Compression => self.by_pair.get(&(round, circuit_id)).copied().unwrap_or(0),
        }
    }

    /// The heaviest weight listed, MiB (0 when none).
    pub fn max(&self) -> i32 {
        self.by_pair.values().copied().max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_weights_and_refuses_bad_files() {
        let w = JobWeights::parse(
            "geometry = \"small\"\n[[weight]]\naggregation_round = 0\ncircuit_id = 1\npeak_mib = 900\n\
             [[weight]]\naggregation_round = 5\ncircuit_id = 0\npeak_mib = 3000\n",
        )
        .unwrap();
        assert_eq!(w.of(JobKind::Proving, 0, 1), 900);
        assert_eq!(w.of(JobKind::Compression, 5, 0), 3000);
        assert_eq!(w.of(JobKind::Proving, 0, 2), 0, "unlisted pair");
        assert_eq!(w.of(JobKind::WitnessGeneration, 0, 1), 0, "witness generation weighs nothing");
        assert_eq!(w.max(), 3000);

        let twice = "[[weight]]\naggregation_round = 0\ncircuit_id = 1\npeak_mib = 1\n".repeat(2);
        assert!(JobWeights::parse(&twice).unwrap_err().contains("twice"));
        let round = "[[weight]]\naggregation_round = 6\ncircuit_id = 1\npeak_mib = 1\n";
        assert!(JobWeights::parse(round).unwrap_err().contains("0..=5"));
        let typo = "[[weight]]\naggregation_round = 0\ncircuit = 1\npeak_mib = 1\n";
        assert!(JobWeights::parse(typo).unwrap_err().contains("circuit"));
    }
}
