//! `proofmesh-bench`: the cluster's figures, each measured in one run and printed with its
//! target (`make bench` runs it after the circuit benchmark):
//! - `dispatch`: job becomes ready -> lease arrives at an idle worker, p50/p99 over no-op jobs
//!   (target p99 < 5 ms);
//! - `stream`: witness-vector push over loopback gRPC in GB/s beside a raw TCP copy of the same
//!   bytes (target >= 1/3 of raw TCP);
//! - `dispatch` also prints lease throughput: lease statements per second from a queue of
//!   thousands of jobs (the scheduling rules cost here);
//! - `affinity`: setup loads with and without setup-data affinity on the largest sample (real
//!   lease statements, simulated provers);
//! - `batch`: the largest sample proven by the cluster as separate processes; batch wall time
//!   divided by (sum of job CPU time / cores) (target <= 1.10);
//! - `fleet`: the scheduler process with N simulated workers over real gRPC (N 10, 100, 1000 and
//!   3000) at queue depths 10k, 100k, 1M, beside an Era-style `SKIP LOCKED` baseline: lease
//!   cycles per second, dispatch and round-boundary latency, CPU per cycle, idle cost, memory
//!   (issue 15's targets). It starts its own PostgreSQL with production durability.
//!
//! Needs `DATABASE_URL` (run through `scripts/with-postgres.sh`; not `fleet`) and, for `batch`
//! and `fleet`, the workspace's binaries (and for `batch` a built setup cache).

mod affinity;
mod batch;
mod dispatch;
mod fleet;
mod stream;

use clap::{Parser, Subcommand};

/// Proofmesh cluster benchmarks.
#[derive(Debug, Parser)]
#[command(about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Which>,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// Dispatch latency.
    Dispatch {
        /// No-op jobs.
        #[arg(long, default_value_t = 2000)]
        jobs: usize,
    },
    /// Stream throughput.
    Stream {
        /// Bytes per witness vector, MiB.
        #[arg(long, default_value_t = 256)]
        mib: usize,
        /// Repetitions (the best of each is reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// Setup loads saved by setup-data affinity.
    Affinity {
        /// The batch file (default: the largest sample).
        #[arg(long, default_value = "samples/batch_000003.bin")]
        batch: std::path::PathBuf,
        /// Geometry (default|small).
        #[arg(long, default_value = "default")]
        geometry: String,
        /// Simulated provers.
        #[arg(long, default_value_t = 4)]
        provers: usize,
        /// Copies of the batch queued together.
        #[arg(long, default_value_t = 4)]
        copies: u32,
    },
    /// Batch efficiency on one batch file.
    Batch(batch::Args),
    /// The scheduler with a simulated fleet at scale, beside an Era-style baseline.
    Fleet(fleet::Args),
    /// All three with their defaults.
    All(batch::Args),
}

/// A geometry by name (`default` or `small`).
fn geometry_named(name: &str) -> anyhow::Result<proofmesh_core::Geometry> {
    match name {
        "default" => Ok(proofmesh_core::Geometry::default()),
        "small" => Ok(proofmesh_core::Geometry::small()),
        other => anyhow::bail!("unknown geometry {other:?} (default|small)"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command.unwrap_or(Which::All(batch::Args::default())) {
        Which::Dispatch { jobs } => dispatch::run(jobs).await,
        Which::Stream { mib, reps } => stream::run(mib, reps).await,
        Which::Affinity { batch, geometry, provers, copies } => affinity::run(&batch, geometry_named(&geometry)?, provers, copies).await,
        Which::Batch(args) => batch::run(args).await,
        Which::Fleet(args) => fleet::run(args).await,
        Which::All(args) => {
            dispatch::run(2000).await?;
            affinity::run(&args.batch, geometry_named(&args.geometry)?, 4, 4).await?;
            stream::run(256, 5).await?;
            batch::run(args).await
        }
    }
}
