//! Batch efficiency: one batch proven by the cluster as separate processes (scheduler, witness
//! generator, WVG, prover, compressor), submitted straight to `Batches` as the gateway would.
//! Reports the batch's wall time (created -> proven, from the scheduler), the sum of the CPU time
//! its jobs reported, and `wall / (cpu / cores)`: 1.0 means every core was busy proving the
//! batch the whole time; the excess is scheduling, streaming, setup loading and idle cores.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proofmesh_core::{batch::Batch, keys, ArtifactStore, LocalStore};
use proofmesh_proto::v1;

/// Settings of the batch benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The batch file (default: the largest sample).
    #[arg(long, default_value = "samples/batch_000003.bin")]
    pub batch: PathBuf,
    /// Geometry (default|small).
    #[arg(long, default_value = "default")]
    pub geometry: String,
    /// Setup data cache (build it first: `make bench` runs the circuit benchmark before).
    #[arg(long, env = "PROOFMESH_SETUP_DIR", default_value = ".setup-cache")]
    pub setup_dir: PathBuf,
    /// Witness vectors a prover proves at once.
    #[arg(long, default_value_t = 2)]
    pub prover_capacity: u32,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            batch: "samples/batch_000003.bin".into(),
            geometry: "default".into(),
            setup_dir: ".setup-cache".into(),
            prover_capacity: 2,
        }
    }
}

/// The cluster's processes; killed when dropped, so an error on the way leaves nothing running.
struct Procs(Vec<Child>);
impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether process `pid` holds a socket listening on TCP `port` (Linux: `/proc/net/tcp*` give
/// the listening sockets' inodes, `/proc/PID/fd` the process's).
fn listens(pid: u32, port: u16) -> bool {
    let mut inodes = vec![];
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1).and_then(|a| a.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
            if f.len() > 9 && f[3] == "0A" && local_port == Some(port) {
                inodes.extend(f[9].parse::<u64>().ok());
            }
        }
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).ok().and_then(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse::<u64>().ok()).is_some_and(|i| inodes.contains(&i))
    })
}

/// Proves `args.batch` through the cluster and prints the figures.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.batch).map_err(|e| anyhow::anyhow!("{}: {e}", args.batch.display()))?;
    let batch = Batch::from_bytes(&bytes)?;
    let bin = std::env::current_exe()?.parent().expect("target dir").to_path_buf();
    let pool = crate::dispatch::fresh_pool().await?;
    let db_url = {
        let url = std::env::var("DATABASE_URL")?;
        let name: String = sqlx::query_scalar("SELECT current_database()").fetch_one(&pool).await?;
        format!("{}/{name}", url.rsplit_once('/').expect("checked").0)
    };
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let url = format!("http://127.0.0.1:{port}");
    let (d, s) = (data.to_str().expect("utf-8"), args.setup_dir.to_str().expect("utf-8"));
    let cap = args.prover_capacity.to_string();
    let listen = format!("127.0.0.1:{port}");
    let mut procs = Procs(vec![]);
    let mut spawn = |name: &str, program: &str, a: &[&str]| -> anyhow::Result<()> {
        let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        procs.0.push(Command::new(bin.join(program)).args(a).stdout(Stdio::null()).stderr(log).spawn()?);
        Ok(())
    };
    spawn("scheduler", "proofmesh-scheduler", &["--listen", &listen, "--database-url", &db_url, "--artifacts", d, "--geometry", &args.geometry])?;
    let common = ["--scheduler", url.as_str(), "--artifacts", d, "--setup-dir", s];
    spawn("wg", "proofmesh-worker", &[&["--role", "witness-generator"][..], &common].concat())?;
    spawn("wvg", "proofmesh-worker", &[&["--role", "wvg"][..], &common].concat())?;
    spawn("prover", "proofmesh-worker", &[&["--role", "prover", "--capacity", &cap][..], &common].concat())?;
    spawn("compressor", "proofmesh-compressor", &["--setup-dir", s, "run", "--scheduler", &url, "--artifacts", d])?;

    let store = Arc::new(LocalStore::new(&data));
    store.put(&keys::batch_input(batch.number), bytes).await?;
    // The scheduler started here must be what answers on the port: not another process that
    // took it first (then this one exits), and not after it exited (then nothing would).
    let scheduler = &mut procs.0[0];
    let deadline = Instant::now() + Duration::from_secs(60);
    let log = || std::fs::read_to_string(logs.join("scheduler.log")).unwrap_or_default();
    let channel = loop {
        if let Some(status) = scheduler.try_wait()? {
            anyhow::bail!("the scheduler exited ({status}) before listening on port {port}; its log:\n{}", log());
        }
        if listens(scheduler.id(), port) {
            if let Ok(c) = tonic::transport::Endpoint::from_shared(url.clone())?.connect().await {
                break c;
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "the scheduler does not listen on port {port} after 60 s; its log:\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Let every worker register before the clock starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut batches = v1::batches_client::BatchesClient::new(channel);
    let started = Instant::now();
    batches
        .submit_batch(v1::SubmitBatchRequest {
            batch_number: batch.number.0,
            protocol_version: Some(batch.protocol_version.into()),
            input_key: keys::batch_input(batch.number),
            priority: 0,
            content_sha256: vec![],
        })
        .await?;
    let mut watch = batches.watch_batch(v1::WatchBatchRequest { batch_number: batch.number.0 }).await?.into_inner();
    let mut last = None;
    while let Some(s) = watch.message().await? {
        last = Some(s);
    }
    let status = last.ok_or_else(|| anyhow::anyhow!("no status"))?;
    anyhow::ensure!(status.state == v1::BatchState::Proven as i32, "batch ended {:?}: {} (logs in {})", status.state, status.error, logs.display());
    let wall = (status.finished_unix_ms - status.created_unix_ms) as f64 / 1e3;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let ratio = wall / (status.compute_secs / cores);
    let circuits: Vec<String> = status.rounds.iter().map(|r| format!("{} {}", r.name, r.total)).collect();
    println!(
        "batch {} ({} transactions; {}), cluster of separate processes on {cores} cores:\n  \
         wall {wall:.1} s (client saw {:.1} s), job CPU {:.1} s, wall / (CPU / cores) = {ratio:.2}   target <= 1.10: {}",
        batch.number,
        batch.transactions.len(),
        circuits.join(", "),
        started.elapsed().as_secs_f64(),
        status.compute_secs,
        if ratio <= 1.10 { "met" } else { "NOT met" }
    );
    Ok(())
}
