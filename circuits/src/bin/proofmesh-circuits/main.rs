//! `proofmesh-circuits`: make sample batches, prove a batch through the whole tree in one
//! process, verify a final proof, and benchmark the circuits.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use proofmesh_circuits::batch::Batch;
use proofmesh_circuits::final_proof::verify;
use proofmesh_circuits::prover::prove_batch;
use proofmesh_circuits::sample::generate_batches;
use proofmesh_circuits::setup::SetupStore;
use proofmesh_circuits::witness_vector::{prove, WitnessVector};
use proofmesh_core::{Geometry, ProtocolVersion};

mod bench;

/// Proofmesh's reference proof system on the command line.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Where setup data (circuits, verifier data) is cached.
    #[arg(long, global = true, env = "PROOFMESH_SETUP_DIR", default_value = ".setup-cache")]
    setup_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

/// A named geometry.
#[derive(Clone, Copy, ValueEnum)]
enum GeometryPreset {
    /// Production default: fan-ins 4, chunks of 256/32/64 items.
    Default,
    /// Small circuits and fan-ins 2, for tests and quick demos.
    Small,
}

/// The circuit geometry: a preset, with the fan-ins overridable.
#[derive(clap::Args)]
struct GeometryArgs {
    /// Geometry preset.
    #[arg(long, value_enum, default_value = "default", env = "PROOFMESH_GEOMETRY")]
    geometry: GeometryPreset,
    /// Basic proofs per leaf aggregation circuit (overrides the preset).
    #[arg(long, env = "PROOFMESH_LEAF_FAN_IN")]
    leaf_fan_in: Option<u8>,
    /// Proofs per node aggregation circuit (overrides the preset).
    #[arg(long, env = "PROOFMESH_NODE_FAN_IN")]
    node_fan_in: Option<u8>,
}

impl GeometryArgs {
    fn geometry(&self) -> Geometry {
        let mut g = match self.geometry {
            GeometryPreset::Default => Geometry::default(),
            GeometryPreset::Small => Geometry::small(),
        };
        g.leaf_fan_in = self.leaf_fan_in.unwrap_or(g.leaf_fan_in);
        g.node_fan_in = self.node_fan_in.unwrap_or(g.node_fan_in);
        g
    }
}

#[derive(Subcommand)]
enum Command {
    /// Simulates the L2 node: writes consecutive batches, each starting at the state root the
    /// previous one ends at, as `batch_<number>.bin`.
    GenBatch {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Transactions per batch, one value per batch (e.g. `--txs 4 --txs 40`).
        #[arg(long, required = true)]
        txs: Vec<usize>,
        /// RNG seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Number of the first batch.
        #[arg(long, default_value_t = 1)]
        first: u32,
        /// State tree depth.
        #[arg(long, default_value_t = 16)]
        depth: u8,
    },
    /// Proves a batch through every round and compression, printing each round's circuit count
    /// and time, and writes `<out>/batch_<number>.proof`.
    Prove {
        /// The batch file.
        #[arg(long)]
        batch: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        geometry: GeometryArgs,
    },
    /// Verifies a final proof against a batch file: exit 0 only if it is valid for exactly that
    /// batch's public data.
    Verify {
        /// The proof file.
        #[arg(long)]
        proof: PathBuf,
        /// The batch file.
        #[arg(long)]
        batch: PathBuf,
    },
    /// Proves one witness vector file (as written by witness vector generation) from its bytes
    /// alone, and writes the proof.
    ProveWitness {
        /// The witness vector file.
        #[arg(long)]
        witness_vector: PathBuf,
        /// Where to write the proof.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        geometry: GeometryArgs,
    },
    /// Prints the final circuit's verification key hash (64 hex digits) for a geometry: what
    /// `Admin.RegisterProtocolVersion` records for the version of these circuits.
    VkHash {
        #[command(flatten)]
        geometry: GeometryArgs,
    },
    /// Prints per-circuit figures (gates, setup, witness and prove time, peak memory, proof size)
    /// and proves the largest batch in `samples`.
    Bench {
        /// Directory of sample batches.
        #[arg(long, default_value = "samples")]
        samples: PathBuf,
        #[command(flatten)]
        geometry: GeometryArgs,
        /// Also write the scheduler's job weights (peak memory per circuit) to this file.
        #[arg(long)]
        weights_out: Option<PathBuf>,
    },
}

fn read_batch(path: &Path) -> anyhow::Result<Batch> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Batch::from_bytes(&bytes).with_context(|| format!("parsing {}", path.display()))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::GenBatch { out, txs, seed, first, depth } => {
            std::fs::create_dir_all(&out)?;
            for b in generate_batches(seed, depth, &txs, first)? {
                let path = out.join(format!("batch_{:06}.bin", b.number.0));
                std::fs::write(&path, b.to_bytes())?;
                println!("{}: {} transactions", path.display(), b.transactions.len());
            }
        }
        Command::Prove { batch, out, geometry } => {
            let batch = read_batch(&batch)?;
            let store = SetupStore::new(&cli.setup_dir, batch.protocol_version, geometry.geometry())?;
            let start = Instant::now();
            let proof = prove_batch(&store, &batch, &mut |_| {}, &mut |r| {
                println!("{:<14} {:>4} circuits  {:>8.2} s", r.label, r.circuits, r.secs);
            })?;
            std::fs::create_dir_all(&out)?;
            let path = out.join(format!("batch_{:06}.proof", batch.number.0));
            let bytes = proof.to_bytes();
            std::fs::write(&path, &bytes)?;
            println!(
                "batch {} proven in {:.1} s: {} ({} bytes; {} uncompressed)",
                batch.number,
                start.elapsed().as_secs_f64(),
                path.display(),
                bytes.len(),
                proof.uncompressed_bytes
            );
        }
        Command::Verify { proof, batch } => {
            let proof_bytes = std::fs::read(&proof).with_context(|| format!("reading {}", proof.display()))?;
            let batch_bytes = std::fs::read(&batch).with_context(|| format!("reading {}", batch.display()))?;
            let public = verify(&proof_bytes, &batch_bytes, &cli.setup_dir)
                .with_context(|| format!("{} does not prove {}", proof.display(), batch.display()))?;
            println!(
                "valid: batch {} (protocol {}), state root {:?} -> {:?}",
                public.batch_number,
                public.protocol_version,
                public.prev_state_root.elements,
                public.new_state_root.elements
            );
        }
        Command::ProveWitness { witness_vector, out, geometry } => {
            let bytes = std::fs::read(&witness_vector).with_context(|| format!("reading {}", witness_vector.display()))?;
            let wv = WitnessVector::from_bytes(&bytes)?;
            let store = SetupStore::new(&cli.setup_dir, ProtocolVersion::CURRENT, geometry.geometry())?;
            let circuit = store.circuit(wv.key)?;
            let proof = prove(&circuit, wv)?;
            std::fs::write(&out, proof.to_bytes()).with_context(|| format!("writing {}", out.display()))?;
        }
        Command::VkHash { geometry } => {
            let store = SetupStore::new(&cli.setup_dir, ProtocolVersion::CURRENT, geometry.geometry())?;
            println!("{}", store.vk_hash()?);
        }
        Command::Bench { samples, geometry, weights_out } => {
            bench::run(&cli.setup_dir, &samples, geometry.geometry(), weights_out.as_deref())?
        }
    }
    Ok(())
}
