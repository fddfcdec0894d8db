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
    proof_bytes: usize,
}

pub fn run(setup_dir: &Path, samples: &Path, geometry: Geometry) -> anyhow::Result<()> {
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
        "{:<15} {:>5} {:>5} {:>18} {:>11} {:>11} {:>10} {:>11}",
        "circuit", "jobs", "log2", "setup", "witness s", "prove s", "peak MiB", "proof B"
    );
    for (key, f) in &per_circuit {
        let setup = match sources.get(key) {
            Some(SetupSource::Built(d)) => format!("built {:.2} s", d.as_secs_f64()),
            Some(SetupSource::Loaded(d)) => format!("loaded {:.2} s", d.as_secs_f64()),
            None => "-".into(),
        };
        println!(
            "{:<15} {:>5} {:>5} {:>18} {:>11.3} {:>11.3} {:>10.0} {:>11}",
            key.name(),
            f.jobs,
            f.degree_bits,
            setup,
            f.witness_secs / f.jobs as f64,
            f.prove_secs / f.jobs as f64,
            f.peak_rss as f64 / (1024.0 * 1024.0),
            f.proof_bytes
        );
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
