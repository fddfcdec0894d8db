//! What the gateway reports per batch file: the JSON summary beside each proof, and the table
//! `--once` prints when every file has ended.

use proofmesh_proto::v1::RoundProgress;
use serde::Serialize;

/// How a batch file ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// The final proof is in the outbox.
    Proven,
    /// The scheduler gave up on the batch (or its proof could not be fetched); the reason is in
    /// `<stem>.error`.
    Failed(String),
    /// The file never became a batch: it does not parse, or the scheduler refused it. The file is
    /// in `<inbox>/rejected/`, the reason in `<stem>.error`.
    Rejected(String),
    /// The gateway was stopped before the batch ended; the next start picks it up again.
    Interrupted,
}

impl Outcome {
    /// The word shown in the table and the JSON `status` field.
    pub(crate) fn word(&self) -> &'static str {
        match self {
            Outcome::Proven => "proven",
            Outcome::Failed(_) => "failed",
            Outcome::Rejected(_) => "rejected",
            Outcome::Interrupted => "interrupted",
        }
    }

    /// The reason, for every outcome but `Proven` and `Interrupted`.
    pub(crate) fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Failed(r) | Outcome::Rejected(r) => Some(r),
            Outcome::Proven | Outcome::Interrupted => None,
        }
    }
}

/// The circuits of one entry of the scheduler's progress: an aggregation round (0..=4), or
/// compression (5). Node aggregation may come as several entries, one per depth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct RoundCount {
    /// `aggregation_round` as the scheduler sends it: 0..=4, 5 for compression.
    pub round: u32,
    /// The scheduler's name for it (`basic`, `leaf`, ...).
    pub name: String,
    /// How many circuits (jobs) it had.
    pub circuits: u32,
}

impl RoundCount {
    /// The counts of a batch's final status, in round order (entries of one round keep the
    /// scheduler's order).
    pub(crate) fn from_progress(rounds: &[RoundProgress]) -> Vec<RoundCount> {
        let mut counts: Vec<RoundCount> = rounds
            .iter()
            .map(|r| RoundCount { round: r.aggregation_round, name: r.name.clone(), circuits: r.total })
            .collect();
        counts.sort_by_key(|r| r.round);
        counts
    }
}

/// The end of one batch file, for the `--once` table.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Report {
    /// The batch file's name in the inbox.
    pub file: String,
    /// `None` if the file did not parse.
    pub batch_number: Option<u32>,
    /// Circuits per round (empty unless the batch ended at the scheduler).
    pub rounds: Vec<RoundCount>,
    /// Size of the final proof.
    pub proof_bytes: Option<usize>,
    /// Seconds from the batch's creation at the scheduler to its end.
    pub wall_secs: Option<f64>,
    /// How it ended.
    pub outcome: Outcome,
}

impl Report {
    /// A report for a file that ended before any scheduler progress was known.
    pub(crate) fn early(file: &str, batch_number: Option<u32>, outcome: Outcome) -> Report {
        Report { file: file.into(), batch_number, rounds: Vec::new(), proof_bytes: None, wall_secs: None, outcome }
    }

    /// True if the gateway should exit non-zero for it under `--once`.
    pub(crate) fn is_failure(&self) -> bool {
        self.outcome != Outcome::Proven
    }
}

/// `<stem>.json`, written beside `<stem>.proof`; also the `summary` of the L2 API's proven
/// answers (`docs/gateway-api.md`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ProofSummary {
    /// The batch's number.
    pub batch_number: u32,
    /// `0.minor.patch`, as `proofmesh_core::ProtocolVersion` displays it.
    pub protocol_version: String,
    /// The batch file's name in the inbox; absent for batches from the L2 node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Transactions in the batch.
    pub transactions: usize,
    /// Size of the final proof (`<stem>.proof`), bytes.
    pub proof_bytes: usize,
    /// Seconds from the batch's creation at the scheduler to its end.
    pub wall_secs: f64,
    /// Compute seconds the workers reported, summed over the batch's jobs.
    pub compute_secs: f64,
    /// Circuits per round, compression included.
    pub rounds: Vec<RoundCount>,
    /// Always `proven` (failed batches get a `.error` instead).
    pub status: &'static str,
}

impl ProofSummary {
    /// Pretty JSON, one field per line, ending with a newline.
    pub(crate) fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a struct of strings and numbers always serializes");
        s.push('\n');
        s
    }
}

/// Seconds between two Unix-millisecond timestamps, 0 if either is missing or they are reversed.
pub(crate) fn wall_secs(created_unix_ms: u64, finished_unix_ms: u64) -> f64 {
    if created_unix_ms == 0 || finished_unix_ms == 0 {
        return 0.0;
    }
    finished_unix_ms.saturating_sub(created_unix_ms) as f64 / 1000.0
}

/// Circuits per aggregation round in one short cell: `basic/leaf/node/tip/scheduler`, entries of
/// one round (node depths) joined by `+`, e.g. `68/17/5+2/1/1`. Compression (always one
/// circuit) is left out; a round with no entry shows `-`.
pub(crate) fn compact_circuits(rounds: &[RoundCount]) -> String {
    if rounds.is_empty() {
        return "-".into();
    }
    (0..=4)
        .map(|round| {
            let cells: Vec<String> =
                rounds.iter().filter(|r| r.round == round).map(|r| r.circuits.to_string()).collect();
            if cells.is_empty() {
                "-".into()
            } else {
                cells.join("+")
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The `--once` table: one row per report (in the order given), then one line per reason a file
/// did not end proven.
pub(crate) fn format_table(reports: &[Report]) -> String {
    const HEADER: [&str; 6] = ["batch", "file", "circuits", "proof bytes", "wall s", "status"];
    // Numbers are right-aligned, text left-aligned.
    const RIGHT: [bool; 6] = [true, false, false, true, true, false];
    let dash = || "-".to_string();
    let rows: Vec<[String; 6]> = reports
        .iter()
        .map(|r| {
            [
                r.batch_number.map_or_else(dash, |n| n.to_string()),
                r.file.clone(),
                compact_circuits(&r.rounds),
                r.proof_bytes.map_or_else(dash, |b| b.to_string()),
                r.wall_secs.map_or_else(dash, |s| format!("{s:.1}")),
                r.outcome.word().to_string(),
            ]
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String; 6]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .zip(RIGHT)
            .map(|((c, w), right)| if right { format!("{c:>w$}") } else { format!("{c:<w$}") })
            .collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(&HEADER.map(String::from));
    for row in &rows {
        out += &line(row);
    }
    for r in reports {
        if let Some(reason) = r.outcome.reason() {
            out += &format!("{}: {}: {reason}\n", r.file, r.outcome.word());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc(round: u32, name: &str, circuits: u32) -> RoundCount {
        RoundCount { round, name: name.into(), circuits }
    }

    fn tree() -> Vec<RoundCount> {
        vec![
            rc(0, "basic", 68),
            rc(1, "leaf", 17),
            rc(2, "node", 5),
            rc(2, "node", 2),
            rc(3, "recursion_tip", 1),
            rc(4, "scheduler", 1),
            rc(5, "compression", 1),
        ]
    }

    #[test]
    fn summary_json_has_every_field_on_its_own_line() {
        let summary = ProofSummary {
            batch_number: 42,
            protocol_version: proofmesh_core::ProtocolVersion { minor: 1, patch: 0 }.to_string(),
            file: Some("batch_000042.bin".into()),
            transactions: 40,
            proof_bytes: 51234,
            wall_secs: 12.5,
            compute_secs: 30.25,
            rounds: tree(),
            status: Outcome::Proven.word(),
        };
        let json = summary.to_json();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["batch_number"], 42);
        assert_eq!(v["protocol_version"], "0.1.0");
        assert_eq!(v["file"], "batch_000042.bin");
        assert_eq!(v["transactions"], 40);
        assert_eq!(v["proof_bytes"], 51234);
        assert_eq!(v["wall_secs"], 12.5);
        assert_eq!(v["compute_secs"], 30.25);
        assert_eq!(v["status"], "proven");
        assert_eq!(v["rounds"].as_array().unwrap().len(), 7);
        assert_eq!(v["rounds"][0], serde_json::json!({"round": 0, "name": "basic", "circuits": 68}));
        for field in [
            "batch_number",
            "protocol_version",
            "file",
            "transactions",
            "proof_bytes",
            "wall_secs",
            "compute_secs",
            "status",
        ] {
            let lines = json.lines().filter(|l| l.trim_start().starts_with(&format!("\"{field}\": "))).count();
            assert_eq!(lines, 1, "field {field} on a line of its own in\n{json}");
        }
    }

    #[test]
    fn rounds_from_progress_are_sorted_by_round() {
        let p = |round: u32, name: &str, total: u32| RoundProgress {
            aggregation_round: round,
            name: name.into(),
            total,
            ..Default::default()
        };
        let counts =
            RoundCount::from_progress(&[p(5, "compression", 1), p(0, "basic", 4), p(2, "node", 2), p(2, "node", 1)]);
        assert_eq!(counts, vec![rc(0, "basic", 4), rc(2, "node", 2), rc(2, "node", 1), rc(5, "compression", 1)]);
    }

    #[test]
    fn circuits_cell_joins_rounds_and_node_depths() {
        assert_eq!(compact_circuits(&tree()), "68/17/5+2/1/1");
        assert_eq!(compact_circuits(&[rc(0, "basic", 3), rc(1, "leaf", 1)]), "3/1/-/-/-");
        assert_eq!(compact_circuits(&[]), "-");
    }

    #[test]
    fn wall_seconds_need_both_timestamps() {
        assert_eq!(wall_secs(1_000, 13_500), 12.5);
        assert_eq!(wall_secs(1_000, 0), 0.0);
        assert_eq!(wall_secs(2_000, 1_000), 0.0);
    }

    #[test]
    fn table_aligns_columns_and_lists_reasons() {
        let reports = vec![
            Report {
                file: "batch_000042.bin".into(),
                batch_number: Some(42),
                rounds: tree(),
                proof_bytes: Some(51234),
                wall_secs: Some(12.54),
                outcome: Outcome::Proven,
            },
            Report::early("junk.bin", None, Outcome::Rejected("batch format: field `magic` at byte 0: bad".into())),
            Report::early("b7.bin", Some(7), Outcome::Failed("prover crashed".into())),
        ];
        let table = format_table(&reports);
        let expected = "\
batch  file              circuits       proof bytes  wall s  status
   42  batch_000042.bin  68/17/5+2/1/1        51234    12.5  proven
    -  junk.bin          -                        -       -  rejected
    7  b7.bin            -                        -       -  failed
junk.bin: rejected: batch format: field `magic` at byte 0: bad
b7.bin: failed: prover crashed
";
        assert_eq!(table, expected, "\n{table}");
        assert!(!reports[0].is_failure());
        assert!(reports[1].is_failure() && reports[2].is_failure());
    }
}
