//! The job graph of a batch: every job of rounds 0..4 and compression, and which feeds which.
//!
//! Built once, when the batch's round-0 witness generation reports how many basic circuits of
//! each type the batch has; everything after follows from the geometry's aggregation plan
//! (DESIGN.md section 1): per circuit type, round-0 proving jobs feed one leaf witness-generation
//! job, which feeds the leaf proving jobs, which feed node witness generation at depth 0, and so
//! on by depth until one node proof per type; the top node proofs of all types feed the
//! recursion tip, which feeds the scheduler round, which feeds compression.

use proofmesh_core::{keys, AggregationRound, BatchNumber, CircuitId, Geometry, GeometryError};

/// What a job does, as stored in `jobs.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobKind {
    /// Builds the inputs of a round's circuits (role witness-generator).
    WitnessGeneration,
    /// Witness vector generation then proving of one circuit (roles wvg and prover).
    Proving,
    /// The compression stage (role compressor).
    Compression,
}

impl JobKind {
    /// The `jobs.kind` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WitnessGeneration => "witness_generation",
            Self::Proving => "proving",
            Self::Compression => "compression",
        }
    }

    /// The inverse of [`JobKind::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [Self::WitnessGeneration, Self::Proving, Self::Compression].into_iter().find(|k| k.as_str() == s)
    }

    /// The wire enum.
    pub fn to_proto(self) -> proofmesh_proto::v1::JobKind {
        use proofmesh_proto::v1::JobKind as P;
        match self {
            Self::WitnessGeneration => P::WitnessGeneration,
            Self::Proving => P::Proving,
            Self::Compression => P::Compression,
        }
    }
}

/// `jobs.aggregation_round` of the compression stage (after round 4).
pub const COMPRESSION_ROUND: u8 = 5;

/// One job to insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    /// What it does.
    pub kind: JobKind,
    /// 0..=4, or [`COMPRESSION_ROUND`].
    pub round: u8,
    /// The circuit id (0 for rounds 3, 4 and compression).
    pub circuit_id: u8,
    /// Node depth (round 2), else 0.
    pub depth: u8,
    /// Position among the jobs of the same `(kind, round, circuit_id, depth)`.
    pub sequence_number: u32,
    /// Artifact the job reads (proving: its circuit input; compression: the scheduler proof).
    pub input_key: Option<String>,
    /// Artifact the job writes (proving: its proof; compression: the final proof).
    pub output_key: Option<String>,
    /// Indices (into the same vector) of the jobs that must succeed first, in input order. Empty:
    /// the job is queued at once.
    pub inputs: Vec<usize>,
}

/// The jobs that follow a batch's round-0 witness generation, given how many basic circuits of
/// each circuit id it produced (`counts`, in circuit-id order). Every index in `inputs` points to
/// an earlier job. Errors: a type with more circuits than the geometry can aggregate.
pub fn plan(batch: BatchNumber, g: &Geometry, counts: &[(CircuitId, u32)]) -> Result<Vec<NewJob>, GeometryError> {
    let mut jobs: Vec<NewJob> = Vec::new();
    let push = |jobs: &mut Vec<NewJob>, job: NewJob| {
        jobs.push(job);
        jobs.len() - 1
    };
    let proving = |round: AggregationRound, id: CircuitId, depth: u8, seq: u32, inputs: Vec<usize>| NewJob {
        kind: JobKind::Proving,
        round: round as u8,
        circuit_id: id.0,
        depth,
        sequence_number: seq,
        input_key: Some(keys::circuit_input(batch, round, id, depth, seq)),
        output_key: Some(keys::proof(batch, round, id, depth, seq)),
        inputs,
    };
    let wg = |round: AggregationRound, id: CircuitId, depth: u8, inputs: Vec<usize>| NewJob {
        kind: JobKind::WitnessGeneration,
        round: round as u8,
        circuit_id: id.0,
        depth,
        sequence_number: 0,
        input_key: None,
        output_key: None,
        inputs,
    };

    let mut tops = Vec::new();
    for &(id, n) in counts {
        let p = g.aggregation_plan(n as usize)?;
        let basic: Vec<usize> = (0..n)
            .map(|s| push(&mut jobs, proving(AggregationRound::BasicCircuits, id, 0, s, vec![])))
            .collect();
        let leaf_wg = push(&mut jobs, wg(AggregationRound::LeafAggregation, id, 0, basic));
        let mut level: Vec<usize> = (0..p.leaves as u32)
            .map(|s| push(&mut jobs, proving(AggregationRound::LeafAggregation, id, 0, s, vec![leaf_wg])))
            .collect();
        for (depth, &count) in p.nodes.iter().enumerate() {
            let depth = depth as u8;
            let node_wg = push(&mut jobs, wg(AggregationRound::NodeAggregation, id, depth, level));
            level = (0..count as u32)
                .map(|s| push(&mut jobs, proving(AggregationRound::NodeAggregation, id, depth, s, vec![node_wg])))
                .collect();
        }
        tops.push(level[0]);
    }
    let single = CircuitId(0);
    let tip_wg = push(&mut jobs, wg(AggregationRound::RecursionTip, single, 0, tops));
    let tip = push(&mut jobs, proving(AggregationRound::RecursionTip, single, 0, 0, vec![tip_wg]));
    let sched_wg = push(&mut jobs, wg(AggregationRound::Scheduler, single, 0, vec![tip]));
    let sched = push(&mut jobs, proving(AggregationRound::Scheduler, single, 0, 0, vec![sched_wg]));
    push(
        &mut jobs,
        NewJob {
            kind: JobKind::Compression,
            round: COMPRESSION_ROUND,
            circuit_id: 0,
            depth: 0,
            sequence_number: 0,
            input_key: Some(keys::proof(batch, AggregationRound::Scheduler, single, 0, 0)),
            output_key: Some(keys::final_proof(batch)),
            inputs: vec![sched],
        },
    );
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(jobs: &[NewJob], kind: JobKind, round: u8) -> usize {
        jobs.iter().filter(|j| j.kind == kind && j.round == round).count()
    }

    #[test]
    fn largest_sample_plan_has_every_round() {
        // 1000 transactions at the default geometry: 4 tx-hasher, 32 main-VM, 32 storage circuits.
        let g = Geometry::default();
        let counts = [(CircuitId(1), 4), (CircuitId(2), 32), (CircuitId(3), 32)];
        let jobs = plan(BatchNumber(3), &g, &counts).unwrap();
        assert_eq!(count(&jobs, JobKind::Proving, 0), 68);
        assert_eq!(count(&jobs, JobKind::Proving, 1), 1 + 8 + 8);
        // Node levels: 1 -> [1]; 8 -> [2, 1] for both heavy types.
        assert_eq!(count(&jobs, JobKind::Proving, 2), 1 + 3 + 3);
        assert_eq!(count(&jobs, JobKind::WitnessGeneration, 2), 1 + 2 + 2);
        assert_eq!(count(&jobs, JobKind::Proving, 3), 1);
        assert_eq!(count(&jobs, JobKind::Compression, COMPRESSION_ROUND), 1);
        // The tip's witness generation waits on the top node of each type, in circuit-id order.
        let tip_wg = jobs.iter().find(|j| j.kind == JobKind::WitnessGeneration && j.round == 3).unwrap();
        let tops: Vec<_> = tip_wg.inputs.iter().map(|&i| (jobs[i].circuit_id, jobs[i].depth)).collect();
        assert_eq!(tops, vec![(1, 0), (2, 1), (3, 1)]);
        // Inputs always point backwards, and only round-0 proving starts queued.
        for (i, j) in jobs.iter().enumerate() {
            assert!(j.inputs.iter().all(|&k| k < i));
            assert_eq!(j.inputs.is_empty(), j.kind == JobKind::Proving && j.round == 0, "{j:?}");
        }
    }

    #[test]
    fn too_many_circuits_is_an_error() {
        let g = Geometry::small();
        assert!(plan(BatchNumber(1), &g, &[(CircuitId(1), 1000)]).is_err());
    }
}
