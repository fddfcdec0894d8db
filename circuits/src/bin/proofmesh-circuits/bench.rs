//! `make bench`: per-circuit figures and a whole-batch run, measured in one process.
//!
//! Proves the largest batch of the samples directory through the whole tree, then prints, for
//! each circuit (round, type, depth): log2 of its rows, how its setup was obtained and in how
//! long, mean witness-vector and prove time, peak process memory, proof size; then the batch's
//! wall time and its proof size before compression (the scheduler proof) and after.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use proofmesh_circuits::batch::Batch;
use proofmesh_circuits::prover::{prove_batch, JobReport};
use proofmesh_circuits::setup::{CircuitKey, SetupSource, SetupStore};
use proofmesh_core::Geometry;

#[derive(Default)]
struct Figures {
    jobs: usize,
    degree_bits: usize,
    witness_secs: f64,
    prove_secs: f64,
    peak_rss: u64,
    /// The job's own peak (peak RSS minus RSS at its start), bytes.
    job_peak: u64,
    proof_bytes: usize,
}

/// Runs the benchmark; with `weights_out`, also writes the scheduler's job weights there (the
/// `--job-weights` file: each `(aggregation_round, circuit_id)`'s largest job peak, MiB).
pub fn run(setup_dir: &Path, samples: &Path, geometry: Geometry, weights_out: Option<&Path>) -> anyhow::Result<()> {
    let mut batches = vec![];
    for entry in std::fs::read_dir(samples)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "bin") {
            batches.push(Batch::from_bytes(&std::fs::read(&path)?)?);
        }
    }
    let batch = batches
        .into_iter()
        .max_by_key(|b| b.transactions.len())
        .ok_or_else(|| anyhow::anyhow!("no batch_*.bin in {}", samples.display()))?;
    let store = SetupStore::new(setup_dir, batch.protocol_version, geometry)?;
    println!(
        "geometry {geometry}; batch {} with {} transactions; setup cache {}",
        batch.number,
        batch.transactions.len(),
        store.folder().display()
    );

    let mut per_circuit: BTreeMap<CircuitKey, Figures> = BTreeMap::new();
    let mut on_job = |r: &JobReport| {
        let f = per_circuit.entry(r.key).or_default();
        f.jobs += 1;
        f.degree_bits = r.degree_bits;
        f.witness_secs += r.witness_secs;
        f.prove_secs += r.prove_secs;
        f.peak_rss = f.peak_rss.max(r.peak_rss_bytes.unwrap_or(0));
        f.job_peak = f.job_peak.max(r.peak_rss_bytes.unwrap_or(0).saturating_sub(r.rss_before_bytes.unwrap_or(0)));
        f.proof_bytes = r.proof_bytes;
    };
    let start = Instant::now();
    let mut rounds = vec![];
    let proof = prove_batch(&store, &batch, &mut on_job, &mut |r| {
        println!("  {:<14} {:>4} circuits {:>8.2} s", r.label, r.circuits, r.secs);
        rounds.push(r.clone());
    })?;
    let wall = start.elapsed().as_secs_f64();

    let sources = store.sources();
    println!();
    println!(
        "{:<15} {:>5} {:>5} {:>18} {:>11} {:>11} {:>10} {:>9} {:>11}",
        "circuit", "jobs", "log2", "setup", "witness s", "prove s", "peak MiB", "job MiB", "proof B"
    );
    for (key, f) in &per_circuit {
        let setup = match sources.get(key) {
            Some(SetupSource::Built(d)) => format!("built {:.2} s", d.as_secs_f64()),
            Some(SetupSource::Loaded(d)) => format!("loaded {:.2} s", d.as_secs_f64()),
            Some(SetupSource::Fetched(d)) => format!("fetched {:.2} s", d.as_secs_f64()),
            None => "-".into(),
        };
        println!(
            "{:<15} {:>5} {:>5} {:>18} {:>11.3} {:>11.3} {:>10.0} {:>9.0} {:>11}",
            key.name(),
            f.jobs,
            f.degree_bits,
            setup,
            f.witness_secs / f.jobs as f64,
            f.prove_secs / f.jobs as f64,
            f.peak_rss as f64 / (1024.0 * 1024.0),
            f.job_peak as f64 / (1024.0 * 1024.0),
            f.proof_bytes
        );
    }
    if let Some(path) = weights_out {
        write_weights(path, geometry, &batch_label(&batch), &per_circuit)?;
        println!("job weights written to {}", path.display());
    }
    let scheduler = per_circuit.get(&CircuitKey::Scheduler).map_or(0, |f| f.proof_bytes);
    let final_bytes = proof.to_bytes().len();
    let compute: f64 = per_circuit.values().map(|f| f.witness_secs + f.prove_secs).sum();
    println!();
    println!("batch {}: {} basic circuits, wall time {wall:.1} s (job compute {compute:.1} s)", batch.number, rounds[0].circuits);
    println!(
        "proof size: scheduler {scheduler} B -> compression {} B -> final file {final_bytes} B (compressed form); ratio {:.2}",
        proof.uncompressed_bytes,
        final_bytes as f64 / scheduler as f64
    );
    Ok(())
}

fn batch_label(batch: &Batch) -> String {
    format!("batch {} ({} transactions)", batch.number, batch.transactions.len())
}

/// Writes the scheduler's `--job-weights` file: per `(aggregation_round, circuit_id)` (node
/// depths together; compression is round 5) the largest job peak measured, MiB, at least 1.
fn write_weights(path: &Path, geometry: Geometry, label: &str, per_circuit: &BTreeMap<CircuitKey, Figures>) -> anyhow::Result<()> {
    let mut by_pair: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    for (key, f) in per_circuit {
        let round = key.round().map_or(5, |r| r as u32);
        let mib = (f.job_peak as f64 / (1024.0 * 1024.0)).ceil().max(1.0) as u64;
        let e = by_pair.entry((round, u32::from(key.circuit_id().0))).or_default();
        *e = (*e).max(mib);
    }
    let mut out = format!(
        "# Job weights for the scheduler's --job-weights: each (aggregation_round, circuit_id)'s peak\n\
         # memory while its witness vector is synthesized and proven, MiB (peak RSS minus RSS at the\n\
         # job's start, its setup data loaded), measured by `make bench` on {label}.\n\
         # Compression is round 5. Regenerate with `make bench`.\n\
         geometry = \"{geometry}\"\n"
    );
    for ((round, id), mib) in by_pair {
        out.push_str(&format!("\n[[weight]]\naggregation_round = {round}\ncircuit_id = {id}\npeak_mib = {mib}\n"));
    }
    std::fs::write(path, out)?;
    Ok(())
}
