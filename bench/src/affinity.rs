//! Setup-data affinity: how many setup loads the scheduler's lease statement saves on the largest
//! sample. The real lease and completion statements run against PostgreSQL; the provers are
//! simulated: each keeps the setup data of up to 4 circuits loaded and frees them all when a fifth
//! is needed (the worker's own policy, `proofmesh_worker::setups`), and finishes its jobs in turn.
//! Copies of the batch are submitted together, as a busy cluster holds several, and the same run
//! is made with affinity on (each prover's loaded pairs sent as `warm`) and off.

use std::collections::VecDeque;

use proofmesh_core::{keys, AggregationRound, BatchNumber, CircuitId, Geometry, ProtocolVersion};
use proofmesh_scheduler::graph::JobKind;
use proofmesh_scheduler::db;
use proofmesh_worker::execute::{witness_generation, WgJob};

/// Setups a simulated prover keeps loaded (as `proofmesh_worker::setups`).
const KEEP_LOADED: usize = 4;

/// One simulated prover: its loaded pairs (`round << 8 | circuit_id`) and the job it holds.
#[derive(Default)]
struct Prover {
    loaded: Vec<i32>,
    holding: Option<uuid::Uuid>,
}

/// Runs the comparison on `batch_file` at `geometry` with `provers` provers and `copies` copies of
/// the batch, and prints both counts and the saving.
pub async fn run(batch_file: &std::path::Path, geometry: Geometry, provers: usize, copies: u32) -> anyhow::Result<()> {
    let input = std::fs::read(batch_file)?;
    let number = proofmesh_core::batch::Batch::from_bytes(&input)?.number;
    let job = WgJob {
        batch: number,
        version: ProtocolVersion::CURRENT,
        geometry,
        round: AggregationRound::BasicCircuits,
        circuit_id: CircuitId(0),
        depth: 0,
    };
    let counts = witness_generation(job, vec![input], &[0]).map_err(|e| anyhow::anyhow!("round-0 witness generation: {e:?}"))?.counts;
    let circuits: u32 = counts.iter().map(|(_, n)| n).sum();
    let mut loads = vec![];
    for affinity in [true, false] {
        loads.push(simulate(geometry, &counts, provers, copies, affinity).await?);
    }
    let (with, without) = (loads[0], loads[1]);
    println!(
        "setup-data affinity on {} ({circuits} basic circuits per batch), {copies} copies, {provers} provers keeping {KEEP_LOADED} setups:\n  \
         setup loads with affinity {with}, without {without}: {} saved ({:.0}%)",
        batch_file.display(),
        without.saturating_sub(with),
        100.0 * without.saturating_sub(with) as f64 / without.max(1) as f64
    );
    Ok(())
}

/// One run: every job of `copies` batches through the lease statement; returns setup loads.
async fn simulate(geometry: Geometry, counts: &[(CircuitId, u32)], provers: usize, copies: u32, affinity: bool) -> anyhow::Result<u64> {
    let pool = crate::dispatch::fresh_pool().await?;
    let settings = crate::dispatch::settings(geometry);
    let policy = &settings.policy;
    for n in 1..=copies {
        let batch = BatchNumber(n);
        db::submit_batch(&pool, &new_batch(batch, &keys::batch_input(batch), 0), &geometry, &settings).await?;
    }
    let mut provers: Vec<Prover> = (0..provers).map(|_| Prover::default()).collect();
    let mut loads = 0u64;
    let mut idle_rounds = 0;
    loop {
        // Witness generation is instant here: every queued WG job completes (round 0 plans the graph).
        let mut wg_done = VecDeque::new();
        while let Some(job) = db::lease(&pool, &db::LeaseAsk::plain(JobKind::WitnessGeneration, "wg", 60.0, policy)).await? {
            wg_done.push_back(job);
        }
        for job in wg_done {
            let c: &[(CircuitId, u32)] = if job.job.aggregation_round == 0 { counts } else { &[] };
            db::complete(&pool, &db::Report { lease: job.lease_id, counts: c.to_vec(), compute_secs: 0.0, verified_against_batch: true, by: None, identity: None }, &settings).await?;
        }
        let mut progressed = false;
        for (i, p) in provers.iter_mut().enumerate() {
            if let Some(lease) = p.holding.take() {
                db::complete(&pool, &db::Report { lease, counts: vec![], compute_secs: 0.0, verified_against_batch: true, by: None, identity: None }, &settings).await?;
                progressed = true;
            }
            let name = format!("prover-{i}");
            let warm = if affinity { p.loaded.clone() } else { vec![] };
            let ask = db::LeaseAsk { warm: &warm, ..db::LeaseAsk::plain(JobKind::Proving, &name, 60.0, policy) };
            if let Some(job) = db::lease(&pool, &ask).await? {
                let pair = i32::from(job.job.aggregation_round) * 256 + i32::from(job.job.circuit_id);
                if !p.loaded.contains(&pair) {
                    loads += 1;
                    if p.loaded.len() >= KEEP_LOADED {
                        p.loaded.clear();
                    }
                    p.loaded.push(pair);
                }
                p.holding = Some(job.lease_id);
                progressed = true;
            }
        }
        let proven: i64 = sqlx::query_scalar("SELECT count(*) FROM batches WHERE status = 'proven'").fetch_one(&pool).await?;
        let compressions: Vec<uuid::Uuid> = {
            let mut v = vec![];
            while let Some(job) = db::lease(&pool, &db::LeaseAsk::plain(JobKind::Compression, "c", 60.0, policy)).await? {
                v.push(job.lease_id);
            }
            v
        };
        for lease in compressions {
            db::complete(&pool, &db::Report { lease, counts: vec![], compute_secs: 0.0, verified_against_batch: true, by: None, identity: None }, &settings).await?;
            progressed = true;
        }
        if proven == i64::from(copies) {
            return Ok(loads);
        }
        idle_rounds = if progressed { 0 } else { idle_rounds + 1 };
        anyhow::ensure!(idle_rounds < 3, "the simulation stalled with {proven} of {copies} batches proven");
    }
}

/// Batch `number` at the current protocol version, with no content hash, as the benchmarks
/// submit it straight into the database.
pub fn new_batch(number: BatchNumber, input_key: &str, priority: i32) -> db::NewBatch<'_> {
    db::NewBatch { number, version: ProtocolVersion::CURRENT, input_key, content_sha256: None, priority }
}
