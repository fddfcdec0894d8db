//! `proofmesh-bench fleet`: the scheduler as a process with a fleet of N simulated workers over
//! real gRPC, on a PostgreSQL server the bench starts with production durability, beside an
//! Era-style baseline (N pollers claiming with `UPDATE ... SKIP LOCKED`) on a copy of the same
//! queue on the same server. For each queue depth and N it measures:
//!
//! - lease cycles per second (lease, complete, next lease) over a fixed window, the workers
//!   completing at once and the queue kept at its depth and mix (`queue`);
//! - dispatch latency: `Batches.SubmitBatch` answered -> its round-0 witness generation's
//!   lease at an idle witness generator; and the round boundary: that witness generator's
//!   `Completed` sent -> the first round-0 proving lease at an idle WVG (the completion inserts
//!   the batch's job graph); each sample batch is cancelled through `Admin.CancelBatch` after;
//! - CPU per cycle of the scheduler and of PostgreSQL (`/proc/PID/stat` utime + stime of the
//!   scheduler process and of the postmaster and its children, less the harness's own
//!   connections), and the idle cost of N connected idle workers;
//! - the scheduler's memory (VmRSS) with N connected;
//!
//! and prints each figure beside its target (issue 15). Missing a target is a result, not an
//! error: the command fails only when something breaks.

mod baseline;
mod pg;
pub(crate) mod procstat;
mod queue;
mod workers;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use proofmesh_core::{keys, BatchNumber};
use proofmesh_proto::v1;
use sqlx::{Connection, Executor, PgConnection};

use procstat::{Snapshot, Used};
use queue::{Requeue, VERSIONS};
use workers::{Fleet, What};

/// Settings of the fleet benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Smaller fleets, one depth and short phases (N 10 and 100, depth 10k; under two minutes).
    #[arg(long)]
    pub quick: bool,
    /// Queue depths (comma-separated; default 10000,100000,1000000, quick 10000).
    #[arg(long, value_delimiter = ',')]
    pub depths: Vec<u64>,
    /// Fleet sizes N (comma-separated; default 10,100,1000, quick 10,100).
    #[arg(long, value_delimiter = ',')]
    pub workers: Vec<usize>,
    /// The large fleet (round boundary and memory only), at the first depth; 0: none
    /// (default 3000; none with --quick).
    #[arg(long)]
    pub big_fleet: Option<usize>,
    /// Write a JSON summary here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The scheduler binary (default: proofmesh-scheduler next to this binary; `make build`).
    #[arg(long)]
    pub scheduler_bin: Option<PathBuf>,
    /// Print, after each throughput window, the statements PostgreSQL spent its time on in that
    /// window (pg_stat_statements, loaded for this run; a diagnostic: it costs a little CPU).
    #[arg(long)]
    pub statements: bool,
}

/// Phase lengths and sample counts.
#[derive(Debug, Clone)]
struct Plan {
    quick: bool,
    statements: bool,
    depths: Vec<u64>,
    ns: Vec<usize>,
    big: Option<usize>,
    warmup: Duration,
    window: Duration,
    idle: Duration,
    samples: usize,
    sample_cap: Duration,
    sample_timeout: Duration,
    settle_cap: Duration,
}

impl Plan {
    fn new(a: &Args) -> Plan {
        let q = a.quick;
        let depths = if !a.depths.is_empty() { a.depths.clone() } else if q { vec![10_000] } else { vec![10_000, 100_000, 1_000_000] };
        let ns = if !a.workers.is_empty() { a.workers.clone() } else if q { vec![10, 100] } else { vec![10, 100, 1000] };
        let big = match a.big_fleet {
            Some(0) => None,
            Some(n) => Some(n),
            None if q => None,
            None => Some(3000),
        };
        let s = |quick: f64, full: f64| Duration::from_secs_f64(if q { quick } else { full });
        Plan {
            quick: q,
            statements: a.statements,
            depths,
            ns,
            big,
            warmup: s(1.0, 2.0),
            window: s(3.0, 10.0),
            idle: s(2.0, 10.0),
            samples: if q { 100 } else { 200 },
            sample_cap: s(4.0, 20.0),
            sample_timeout: s(3.0, 5.0),
            settle_cap: s(3.0, 20.0),
        }
    }
}

/// The scheduler process; SIGTERM (then SIGKILL) on drop.
struct Scheduler {
    child: Child,
    url: String,
    log: PathBuf,
    startup: Duration,
}

impl Scheduler {
    async fn start(bin: &Path, db_url: &str, work: &Path, tag: &str) -> anyhow::Result<Scheduler> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = work.join(format!("scheduler-{tag}.log"));
        let artifacts = work.join("artifacts");
        std::fs::create_dir_all(&artifacts)?;
        let groups = work.join("prover-groups.toml");
        std::fs::write(&groups, queue::GROUPS_TOML)?;
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--database-url", db_url, "--geometry", "small"])
            .arg("--artifacts")
            .arg(&artifacts)
            .arg("--prover-groups")
            .arg(&groups)
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        // SAFETY: prctl is async-signal-safe. The scheduler dies with the thread that started it
        // (the main thread), so it cannot outlive a killed bench.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = cmd.spawn().with_context(|| format!("starting {} (build it: make build)", bin.display()))?;
        let mut s = Scheduler { child, url: format!("http://127.0.0.1:{port}"), log, startup: Duration::ZERO };
        // Serving once Admin answers (it migrates and re-ranks the queue before it listens).
        loop {
            if let Some(status) = s.child.try_wait()? {
                anyhow::bail!("the scheduler exited ({status}) at start:\n{}", s.log_tail());
            }
            if let Ok(ch) = tonic::transport::Endpoint::from_shared(s.url.clone())?.connect().await {
                if v1::admin_client::AdminClient::new(ch).list_protocol_versions(v1::ListProtocolVersionsRequest {}).await.is_ok() {
                    break;
                }
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "the scheduler did not serve within 600 s:\n{}", s.log_tail());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        s.startup = started.elapsed();
        Ok(s)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("the scheduler exited ({status}):\n{}", self.log_tail());
        }
        Ok(())
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How often the harness queues again the jobs completed since (the scheduler re-reads its
/// queued classes on completions, so a class emptied for longer than this may wait for the next).
const REQUEUE_EVERY: Duration = Duration::from_millis(5);

/// Latency samples: `None` = none within the per-sample timeout.
type Samples = Vec<Option<Duration>>;

/// One fleet (N) at one depth.
#[derive(Debug, Clone, Default)]
struct FleetRow {
    depth: u64,
    n: usize,
    roles: (usize, usize, usize),
    queued_cycle: i64,
    queued_other: i64,
    connect: Duration,
    /// Throughput window (None for the large fleet).
    cycles: Option<u64>,
    window: f64,
    recorded: u64,
    busy: Used,
    settle: (Duration, bool),
    idle: Used,
    dispatch: Samples,
    early: usize,
    boundary: Samples,
    rss: (f64, f64),
    unmatched: u64,
}

/// The baseline at one depth and N.
#[derive(Debug, Clone, Default)]
struct BaseRow {
    depth: u64,
    n: usize,
    pool: usize,
    claims: u64,
    window: f64,
    busy: Used,
    idle: Used,
    latency: Samples,
}

/// `p` (0..1) of `v`, a missing sample counting as longer than any: `None` when empty,
/// `Some(None)` when it falls on a missing one.
fn pct(v: &Samples, p: f64) -> Option<Option<Duration>> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.clone();
    s.sort_by(|a, b| match (a, b) {
        (Some(a), Some(b)) => a.cmp(b),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
    Some(s[((s.len() as f64 - 1.0) * p).round() as usize])
}

fn ms(d: Option<Option<Duration>>, timeout: Duration) -> String {
    match d {
        None => "-".into(),
        Some(None) => format!(">{:.0}s", timeout.as_secs_f64()),
        Some(Some(d)) => format!("{:.2}", d.as_secs_f64() * 1e3),
    }
}

fn ms_value(d: Option<Option<Duration>>) -> serde_json::Value {
    match d {
        Some(Some(d)) => serde_json::json!(d.as_secs_f64() * 1e3),
        Some(None) => serde_json::json!("timeout"),
        None => serde_json::Value::Null,
    }
}

fn depth_name(d: u64) -> String {
    match d {
        d if d >= 1_000_000 && d % 1_000_000 == 0 => format!("{}M", d / 1_000_000),
        d if d >= 1_000 && d % 1_000 == 0 => format!("{}k", d / 1_000),
        d => d.to_string(),
    }
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn raise_nofile() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn nofile() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid pointer to an rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    r.rlim_cur
}

/// Whether process `pid` exists.
fn alive(pid: &str) -> bool {
    pid.trim().parse::<u32>().is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists())
}

/// Deletes what an earlier run killed with SIGKILL left in /tmp (its PostgreSQL and scheduler
/// died with it, by their parent-death signal; its directories could not be deleted): a data
/// directory whose postmaster is gone, a work directory whose bench is gone. A directory without
/// its pid file is left alone for ten minutes (a run starting now has not written it yet).
fn sweep_stale() {
    let mut places = vec![PathBuf::from("/tmp"), std::env::temp_dir()];
    places.dedup();
    for entry in places.iter().filter_map(|p| std::fs::read_dir(p).ok()).flat_map(|d| d.flatten()) {
        let name = entry.file_name().to_string_lossy().to_string();
        let pid_file = if name.starts_with("proofmesh-fleet-pg.") {
            entry.path().join("data/postmaster.pid")
        } else if name.starts_with("proofmesh-fleet.") {
            entry.path().join("bench.pid")
        } else {
            continue;
        };
        let stale = match std::fs::read_to_string(&pid_file) {
            Ok(text) => !alive(text.lines().next().unwrap_or("")),
            Err(_) => entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(600)),
        };
        if stale && std::fs::remove_dir_all(entry.path()).is_ok() {
            eprintln!("fleet: removed {} (left by an earlier run that was killed)", entry.path().display());
        }
    }
}

/// Runs the benchmark; interrupted (SIGINT, SIGTERM), it stops the scheduler and PostgreSQL
/// (the guards' drops) and fails.
pub async fn run(args: Args) -> anyhow::Result<()> {
    raise_nofile();
    sweep_stale();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = bench(&args) => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted (SIGINT): scheduler and PostgreSQL stopped"),
        _ = term.recv() => anyhow::bail!("interrupted (SIGTERM): scheduler and PostgreSQL stopped"),
    }
}

/// Waits until the scheduler and PostgreSQL use under a quarter of a core over half a second
/// (the registrations' wake-ups worked through), up to `cap`.
async fn settle(sched: i32, pm: i32, exclude: &[i32], cap: Duration) -> (Duration, bool) {
    let start = Instant::now();
    loop {
        let a = Snapshot::take(sched, pm);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let u = a.until(&Snapshot::take(sched, pm), exclude);
        if (u.scheduler + u.postgres) / u.wall.max(1e-3) < 0.25 {
            return (start.elapsed(), true);
        }
        if start.elapsed() >= cap {
            return (start.elapsed(), false);
        }
    }
}

/// Waits until the scheduler and PostgreSQL have used no CPU tick for 30 ms (the wake-up the last
/// sample caused is worked through), up to `cap`.
async fn quiesce(sched: i32, pm: i32, cap: Duration) {
    let deadline = Instant::now() + cap;
    let (mut last, mut still) = (procstat::busy_ticks(sched, pm), 0);
    while Instant::now() < deadline && still < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = procstat::busy_ticks(sched, pm);
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
}

/// Tells the scheduler that the queue changed the way production does it: through its API.
/// The harness queues and parks the fleet's jobs directly in the database, which the scheduler
/// cannot see (it re-reads the queued classes only when the job state changes through it); a
/// `SubmitBatch` of a batch of the version no bench worker proves is such a change (its one
/// witness generation job joins the other classes).
async fn poke(url: &str, next_batch: &mut u32) -> anyhow::Result<()> {
    let b = *next_batch;
    *next_batch += 1;
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())?.connect().await?;
    let (minor, patch) = queue::OTHER_VERSION;
    v1::batches_client::BatchesClient::new(channel)
        .submit_batch(submit_request(b, minor, patch))
        .await
        .context("SubmitBatch (telling the scheduler the queue changed)")?;
    Ok(())
}

async fn server_clock(c: &mut PgConnection) -> anyhow::Result<f64> {
    Ok(sqlx::query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8").fetch_one(c).await?)
}

/// Everything measured at one depth for one fleet size, against the running scheduler.
#[allow(clippy::too_many_arguments)]
async fn fleet_phases(
    plan: &Plan,
    sched: &mut Scheduler,
    pm: i32,
    requeue: Requeue,
    clock: &mut PgConnection,
    exclude: &[i32],
    depth: u64,
    n: usize,
    throughput: bool,
    next_batch: &mut u32,
) -> anyhow::Result<(FleetRow, Requeue)> {
    let mut row = FleetRow { depth, n, ..FleetRow::default() };
    let mut requeue = requeue;
    if throughput {
        queue::start_cycle(requeue.conn()).await?;
        poke(&sched.url, next_batch).await?;
    }
    (row.queued_cycle, row.queued_other) = queue::queued(requeue.conn()).await?;
    let sched_pid = sched.pid();

    // The fleet cycles from its first registration: requeue from the start.
    let stop_requeue = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let (fleet, mut events) = Fleet::connect(&sched.url, n, 100, Duration::from_secs(180), throughput).await?;
    row.connect = started.elapsed();
    row.roles = fleet.census();
    sched.alive()?;

    if throughput {
        let shared = fleet.shared.clone();
        let stop = stop_requeue.clone();
        let task = tokio::spawn(async move {
            let mut requeue = requeue;
            loop {
                let done = stop.is_cancelled();
                let batch: Vec<queue::JobKey> = std::mem::take(&mut *shared.completed.lock().expect("poisoned"));
                requeue.by_key(&batch).await?;
                if done {
                    return anyhow::Ok(requeue);
                }
                tokio::time::sleep(REQUEUE_EVERY).await;
            }
        });
        tokio::time::sleep(plan.warmup).await;
        let c0 = fleet.shared.cycle_leases.load(std::sync::atomic::Ordering::SeqCst);
        if plan.statements {
            clock.execute("SELECT pg_stat_statements_reset()").await?;
        }
        let s0 = Snapshot::take(sched_pid, pm);
        let t0 = server_clock(clock).await?;
        tokio::time::sleep(plan.window).await;
        let c1 = fleet.shared.cycle_leases.load(std::sync::atomic::Ordering::SeqCst);
        let s1 = Snapshot::take(sched_pid, pm);
        let t1 = server_clock(clock).await?;
        if plan.statements {
            statements(clock, c1 - c0).await?;
        }
        row.busy = s0.until(&s1, exclude);
        row.cycles = Some(c1 - c0);
        row.window = row.busy.wall;
        fleet.shared.collect.store(false, std::sync::atomic::Ordering::SeqCst);
        stop_requeue.cancel();
        requeue = task.await??;
        queue::park_cycle(requeue.conn()).await?;
        poke(&sched.url, next_batch).await?;
        fleet.quiet(Duration::from_millis(200), Duration::from_secs(30)).await;
        fleet.settled(Duration::from_secs(30)).await;
        row.recorded = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM leases WHERE outcome = 'succeeded' AND ended_at >= to_timestamp($1) AND ended_at < to_timestamp($2)",
        )
        .bind(t0)
        .bind(t1)
        .fetch_one(requeue.conn())
        .await? as u64;
        sched.alive()?;
    }

    // Idle: nothing of the fleet's classes queued.
    row.settle = settle(sched_pid, pm, exclude, plan.settle_cap).await;
    let s0 = Snapshot::take(sched_pid, pm);
    tokio::time::sleep(plan.idle).await;
    row.idle = s0.until(&Snapshot::take(sched_pid, pm), exclude);

    // Latency samples, one batch at a time.
    let channel = tonic::transport::Endpoint::from_shared(sched.url.clone())?.tcp_nodelay(true).connect().await?;
    let mut batches = v1::batches_client::BatchesClient::new(channel.clone());
    let mut admin = v1::admin_client::AdminClient::new(channel);
    let start = Instant::now();
    for k in 0..plan.samples {
        if start.elapsed() >= plan.sample_cap {
            break;
        }
        let b = *next_batch;
        *next_batch += 1;
        while events.try_recv().is_ok() {}
        let (minor, patch) = VERSIONS[k % 2];
        batches
            .submit_batch(submit_request(b, minor, patch))
            .await
            .context("SubmitBatch")?;
        let replied = Instant::now();
        let deadline = tokio::time::Instant::from_std(replied + plan.sample_timeout);
        let (mut wg, mut sent, mut proving) = (None, None, None);
        while proving.is_none() {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(e)) if e.batch == b => match e.what {
                    What::WgLease => wg = Some(e.at),
                    What::WgCompletedSent => sent = Some(e.at),
                    What::ProvingLease => proving = Some(e.at),
                },
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        if wg.is_some_and(|t| t < replied) {
            row.early += 1;
        }
        row.dispatch.push(wg.map(|t| t.saturating_duration_since(replied)));
        if let Some(sent) = sent {
            row.boundary.push(proving.map(|p| p.saturating_duration_since(sent)));
        }
        let _ = admin.cancel_batch(v1::CancelBatchRequest { batch_number: b, reason: "fleet bench: sample taken".into() }).await;
        fleet.quiet(Duration::from_millis(20), Duration::from_secs(2)).await;
        quiesce(sched_pid, pm, Duration::from_secs(2)).await;
    }
    row.rss = procstat::rss_mib(sched_pid);
    row.unmatched = fleet.shared.unmatched.load(std::sync::atomic::Ordering::SeqCst);
    sched.alive()?;

    fleet.disconnect();
    drop(fleet);
    // Until the scheduler has let every stream go.
    let gone = Instant::now();
    loop {
        let workers = admin.list_workers(v1::ListWorkersRequest {}).await?.into_inner().workers.len();
        if workers == 0 {
            break;
        }
        anyhow::ensure!(gone.elapsed() < Duration::from_secs(120), "{workers} workers still connected 120 s after the fleet closed its streams");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok((row, requeue))
}

/// Prints the statements of the window just ended by their total execution time (`--statements`).
async fn statements(c: &mut PgConnection, cycles: u64) -> anyhow::Result<()> {
    let rows: Vec<(i64, f64, f64, i64, String)> = sqlx::query_as(
        "SELECT calls, total_exec_time, total_plan_time, rows, left(regexp_replace(query, '\\s+', ' ', 'g'), 110)
         FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat_statements%' ORDER BY total_exec_time + total_plan_time DESC LIMIT 15",
    )
    .fetch_all(c)
    .await?;
    println!("  statements in the window ({cycles} cycles): calls, exec ms, plan ms, rows, us per cycle, query");
    for (calls, exec, plan, n, q) in rows {
        println!("    {calls:>7} {exec:>9.1} {plan:>8.1} {n:>7} {:>7.1}  {q}", (exec + plan) * 1000.0 / cycles.max(1) as f64);
    }
    Ok(())
}

/// The baseline at one depth and N, on the copy of the queue.
async fn baseline_phases(plan: &Plan, url: &str, pm: i32, requeue: Requeue, exclude: &[i32], depth: u64, n: usize) -> anyhow::Result<(BaseRow, Requeue)> {
    let mut requeue = requeue;
    queue::start_cycle(requeue.conn()).await?;
    let (pollers, mut events) = baseline::Pollers::start(url, n).await?;
    let mut row = BaseRow { depth, n, pool: pollers.connections, ..BaseRow::default() };
    let shared = pollers.shared.clone();
    shared.collect.store(true, std::sync::atomic::Ordering::SeqCst);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = {
        let (shared, stop) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            let mut requeue = requeue;
            loop {
                let done = stop.is_cancelled();
                let ids: Vec<i64> = std::mem::take(&mut *shared.completed.lock().expect("poisoned"));
                requeue.by_id(&ids).await?;
                if done {
                    return anyhow::Ok(requeue);
                }
                tokio::time::sleep(REQUEUE_EVERY).await;
            }
        })
    };
    tokio::time::sleep(plan.warmup).await;
    let c0 = shared.claims.load(std::sync::atomic::Ordering::SeqCst);
    let s0 = Snapshot::take(0, pm);
    tokio::time::sleep(plan.window).await;
    let c1 = shared.claims.load(std::sync::atomic::Ordering::SeqCst);
    row.busy = s0.until(&Snapshot::take(0, pm), exclude);
    row.claims = c1 - c0;
    row.window = row.busy.wall;
    shared.collect.store(false, std::sync::atomic::Ordering::SeqCst);
    stop.cancel();
    let mut requeue = task.await??;
    queue::park_cycle(requeue.conn()).await?;
    // Every poller has found nothing once and sleeps.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let s0 = Snapshot::take(0, pm);
    tokio::time::sleep(plan.idle).await;
    row.idle = s0.until(&Snapshot::take(0, pm), exclude);

    let start = Instant::now();
    for k in 0..plan.samples as u32 {
        if start.elapsed() >= plan.sample_cap {
            break;
        }
        while events.try_recv().is_ok() {}
        let id = baseline::insert_sample(requeue.conn(), k + 1000 * n as u32, k as usize % 2).await?;
        let ready = Instant::now();
        let deadline = tokio::time::Instant::from_std(ready + plan.sample_timeout);
        let mut got = None;
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some((at, job))) if job == id => {
                    got = Some(at.saturating_duration_since(ready));
                    break;
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        row.latency.push(got);
    }
    pollers.stop().await;
    Ok((row, requeue))
}

async fn bench(args: &Args) -> anyhow::Result<()> {
    let plan = Plan::new(args);
    let began = Instant::now();
    let bin = match &args.scheduler_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.parent().context("no directory")?.join("proofmesh-scheduler"),
    };
    anyhow::ensure!(bin.exists(), "{} not found: build it first (make build, or cargo build -p proofmesh-scheduler --bins)", bin.display());
    let work = tempfile::Builder::new().prefix("proofmesh-fleet.").tempdir()?;
    std::fs::write(work.path().join("bench.pid"), std::process::id().to_string())?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    let mut settings = vec![("max_connections", "400".to_string()), ("shared_buffers", "1GB".into()), ("max_wal_size", "8GB".into())];
    if args.statements {
        settings.extend([("shared_preload_libraries", "pg_stat_statements".to_string()), ("pg_stat_statements.track_planning", "on".into())]);
    }
    let pg = pg::Postgres::start(&settings).await?;
    let base_url = pg.url("").trim_end_matches('/').to_string();
    let mut admin = PgConnection::connect(&pg.url("postgres")).await?;
    let admin_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut admin).await?;
    if args.statements {
        admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").await?;
    }
    let mut shown = vec![];
    for name in ["fsync", "synchronous_commit", "full_page_writes", "wal_level", "shared_buffers", "max_connections", "max_wal_size"] {
        let v: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {name}"))).fetch_one(&mut admin).await?;
        shown.push((name, v));
    }
    let durable = shown.iter().take(3).all(|(_, v)| v == "on");
    anyhow::ensure!(durable, "PostgreSQL's durability settings are not all on: {shown:?}");

    println!("== proofmesh-bench fleet{} ==", if args.quick { " --quick" } else { "" });
    println!(
        "conditions: {cores} cores; {} (started by the bench at 127.0.0.1:{}, data {}), read back with SHOW: {}",
        pg.version,
        pg.port,
        pg.data_dir().display(),
        shown.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
    );
    println!("  durable commits: every commit waits for its WAL fsync (the production settings; tests may turn them off, this bench never does)");
    println!(
        "scheduler: {} --geometry small --prover-groups (2 groups) --artifacts TMP, otherwise its own defaults (heartbeats, lease timeout, database connections); \
         a new process per depth, on a fresh database",
        bin.display()
    );
    println!(
        "fleet: N workers in this process, each the real LeaseClient over its own gRPC connection; per zone (a, b) and five: 1 witness generator, 2 WVGs, \
         2 provers (capacity {}); prover groups 0 and 1; versions {} and {} (provers both); executors complete at once; a WVG hands the lease to the matched \
         prover (heartbeat take-over), which reports Completed",
        workers::PROVER_CAPACITY,
        ver(VERSIONS[0]),
        ver(VERSIONS[1])
    );
    println!(
        "queue: depth = queued jobs; 90% of classes no bench worker takes (version {}, pairs outside the groups, compression) spread evenly through the lease \
         order with the fleet's 10%; during a throughput window each completed job is queued again at its place (a harness connection, left out of the CPU figures, \
         every {} ms); the idle and latency phases see the other 90% only; each harness change to the queue is followed by a SubmitBatch of version {} so the \
         scheduler learns of it as of any change",
        ver(queue::OTHER_VERSION),
        REQUEUE_EVERY.as_millis(),
        ver(queue::OTHER_VERSION)
    );
    println!(
        "baseline (Era-style): N pollers, one UPDATE ... WHERE id = (SELECT ... ORDER BY urgency DESC, batch_number, aggregation_round DESC, id LIMIT 1 \
         FOR UPDATE SKIP LOCKED) claim and one \
         completion each, sleeping 1 s only when they find nothing; poller i takes fleet worker i's class; a pool of min(N, {}) connections; on a copy of the same \
         queue (our jobs table, schema and indexes, plus one index for its claim: kind, version, lease order, over queued jobs; in a database of its \
         own on the same server), with the scheduler stopped",
        baseline::MAX_POOL
    );
    println!(
        "phases: warm-up {:.0} s, window {:.0} s, idle {:.0} s, latency up to {} samples or {:.0} s (per-sample timeout {:.0} s); open files limit {}",
        plan.warmup.as_secs_f64(),
        plan.window.as_secs_f64(),
        plan.idle.as_secs_f64(),
        plan.samples,
        plan.sample_cap.as_secs_f64(),
        plan.sample_timeout.as_secs_f64(),
        nofile()
    );
    println!();

    let mut rows: Vec<FleetRow> = vec![];
    let mut big_row: Option<FleetRow> = None;
    let mut base: Vec<BaseRow> = vec![];
    let mut setup: Vec<serde_json::Value> = vec![];
    let mut next_batch = queue::SAMPLE_BASE;
    for (di, &depth) in plan.depths.iter().enumerate() {
        let (fleet_db, era_db) = (format!("fleet_{depth}"), format!("era_{depth}"));
        let t = Instant::now();
        queue::create(&mut admin, &base_url, &fleet_db).await?;
        queue::populate(&format!("{base_url}/{fleet_db}"), depth).await?;
        let populated = t.elapsed();
        let t = Instant::now();
        admin.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {era_db}"))).await?;
        admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {era_db} TEMPLATE {fleet_db} STRATEGY FILE_COPY"))).await?;
        let copied = t.elapsed();
        let mut sched = Scheduler::start(&bin, &format!("{base_url}/{fleet_db}"), work.path(), &depth.to_string()).await?;
        let mut requeue = Requeue::connect(&format!("{base_url}/{fleet_db}")).await?;
        // The scheduler's start-up re-ranking rewrote every queued row: vacuum before measuring.
        let t = Instant::now();
        requeue.conn().execute("VACUUM ANALYZE jobs").await?;
        let vacuumed = t.elapsed();
        eprintln!(
            "fleet: depth {}: populated in {:.1} s, copied for the baseline in {:.1} s, scheduler serving after {:.1} s (migrations and re-ranking), vacuumed in {:.1} s",
            depth_name(depth),
            populated.as_secs_f64(),
            copied.as_secs_f64(),
            sched.startup.as_secs_f64(),
            vacuumed.as_secs_f64()
        );
        setup.push(serde_json::json!({
            "depth": depth, "populate_secs": populated.as_secs_f64(), "copy_secs": copied.as_secs_f64(),
            "scheduler_startup_secs": sched.startup.as_secs_f64(), "vacuum_secs": vacuumed.as_secs_f64(),
        }));
        let exclude = [requeue.backend, admin_pid];
        for &n in &plan.ns {
            let t = Instant::now();
            let (row, back) = fleet_phases(&plan, &mut sched, pg.pid(), requeue, &mut admin, &exclude, depth, n, true, &mut next_batch).await?;
            requeue = back;
            eprintln!("fleet: depth {} N {n}: scheduler phases done in {:.0} s", depth_name(depth), t.elapsed().as_secs_f64());
            rows.push(row);
        }
        if let (0, Some(n)) = (di, plan.big) {
            let t = Instant::now();
            let (row, back) = fleet_phases(&plan, &mut sched, pg.pid(), requeue, &mut admin, &exclude, depth, n, false, &mut next_batch).await?;
            requeue = back;
            eprintln!("fleet: depth {} N {n} (large fleet): done in {:.0} s", depth_name(depth), t.elapsed().as_secs_f64());
            big_row = Some(row);
        }
        drop(sched);
        drop(requeue);
        let era_url = format!("{base_url}/{era_db}");
        let mut requeue = Requeue::connect(&era_url).await?;
        requeue.conn().execute(queue::BASELINE_INDEX).await?;
        requeue.conn().execute("ANALYZE jobs").await?;
        let exclude = [requeue.backend, admin_pid];
        for &n in &plan.ns {
            let t = Instant::now();
            let (row, back) = baseline_phases(&plan, &era_url, pg.pid(), requeue, &exclude, depth, n).await?;
            requeue = back;
            eprintln!("fleet: depth {} N {n}: baseline done in {:.0} s", depth_name(depth), t.elapsed().as_secs_f64());
            base.push(row);
        }
        drop(requeue);
        for db in [&fleet_db, &era_db] {
            admin.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))).await?;
        }
    }

    report(&plan, &rows, big_row.as_ref(), &base, cores);
    let took = began.elapsed();
    println!("\nfleet: the whole run took {:.0} s", took.as_secs_f64());
    if let Some(path) = &args.out {
        let json = summary(&plan, &rows, big_row.as_ref(), &base, &shown, cores, took, setup);
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
        println!("fleet: summary written to {}", path.display());
    }
    let _ = admin.close().await;
    drop(pg);
    Ok(())
}

fn ver((minor, patch): (u16, u16)) -> String {
    format!("0.{minor}.{patch}")
}

fn baseline_of(base: &[BaseRow], depth: u64, n: usize) -> Option<&BaseRow> {
    base.iter().find(|b| b.depth == depth && b.n == n)
}

fn per_s(cycles: u64, wall: f64) -> f64 {
    cycles as f64 / wall.max(1e-9)
}

fn us_per(secs: f64, cycles: u64) -> String {
    if cycles == 0 {
        "-".into()
    } else {
        format!("{:.0}", secs * 1e6 / cycles as f64)
    }
}

fn core_pct(secs: f64, wall: f64) -> f64 {
    secs / wall.max(1e-9) * 100.0
}

fn report(plan: &Plan, rows: &[FleetRow], big: Option<&FleetRow>, base: &[BaseRow], cores: usize) {
    let t = plan.sample_timeout;
    println!("-- lease cycles per second (lease, complete, next lease; durable commits) --");
    println!(
        "{:>6} {:>5} {:>17} {:>10} {:>11} {:>12} {:>11} {:>8} {:>7}   target: >= 10,000/s and >= 3x baseline",
        "depth", "N", "WG/WVG/prover", "queued", "fleet/s", "recorded/s", "baseline/s", "ratio", "other"
    );
    for r in rows {
        let Some(cycles) = r.cycles else { continue };
        let f = per_s(cycles, r.window);
        let rec = per_s(r.recorded, r.window);
        let b = baseline_of(base, r.depth, r.n).map(|b| per_s(b.claims, b.window));
        let ratio = b.map(|b| f / b.max(1e-9));
        println!(
            "{:>6} {:>5} {:>17} {:>10} {:>11.0} {:>12.0} {:>11} {:>8} {:>7}   {}",
            depth_name(r.depth),
            r.n,
            format!("{}/{}/{}", r.roles.0, r.roles.1, r.roles.2),
            r.queued_cycle + r.queued_other,
            f,
            rec,
            b.map_or("-".into(), |b| format!("{b:.0}")),
            ratio.map_or("-".into(), |x| format!("{x:.2}x")),
            format!("{:.0}%", core_pct(r.busy.other, r.busy.wall)),
            met(f >= 10_000.0 && ratio.is_some_and(|x| x >= 3.0))
        );
    }
    println!("  other: CPU used in the window by processes outside this benchmark (other users of the machine), % of one core: the figures are only as clean as that is low");
    println!("  fleet/s: leases of queue jobs received by the fleet in the window; recorded/s: successes PostgreSQL recorded in it (leases.ended_at)");
    println!("  baseline/s: claims completed by the pollers in the window (pool of min(N, {}) connections)", baseline::MAX_POOL);

    println!("\n-- dispatch latency, ms (SubmitBatch answered -> round-0 witness generation lease at an idle witness generator) --");
    println!(
        "{:>6} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8}  {:>9} {:>9} {:>9}   target: p99 < 5 ms (N = 1,000)",
        "depth", "N", "samples", "p50", "p99", "max", "early", "base n", "base p50", "base p99"
    );
    for r in rows.iter().chain(big) {
        let b = baseline_of(base, r.depth, r.n);
        let p99 = pct(&r.dispatch, 0.99);
        println!(
            "{:>6} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8}  {:>9} {:>9} {:>9}   {}",
            depth_name(r.depth),
            r.n,
            r.dispatch.len(),
            ms(pct(&r.dispatch, 0.5), t),
            ms(p99, t),
            ms(pct(&r.dispatch, 1.0), t),
            r.early,
            b.map_or("-".into(), |b| b.latency.len().to_string()),
            b.map_or("-".into(), |b| ms(pct(&b.latency, 0.5), t)),
            b.map_or("-".into(), |b| ms(pct(&b.latency, 0.99), t)),
            met(matches!(p99, Some(Some(d)) if d < Duration::from_millis(5)))
        );
    }
    println!("  early: leases that reached the worker before SubmitBatch's reply reached the bench (counted as 0 ms)");
    println!("  baseline: a job inserted and committed -> claimed by a poller (they sleep 1 s when they find nothing)");

    println!("\n-- round boundary, ms (round-0 witness generation's Completed sent -> first round-0 proving lease at an idle WVG) --");
    println!("{:>6} {:>5} {:>8} {:>8} {:>8} {:>8}   target: p99 < 5 ms (N = 1,000); < 10 ms with 3,000 connected", "depth", "N", "samples", "p50", "p99", "max");
    for r in rows.iter().chain(big) {
        let p99 = pct(&r.boundary, 0.99);
        let limit = if big.is_some_and(|b| std::ptr::eq(b, r)) { 10 } else { 5 };
        println!(
            "{:>6} {:>5} {:>8} {:>8} {:>8} {:>8}   {}",
            depth_name(r.depth),
            r.n,
            r.boundary.len(),
            ms(pct(&r.boundary, 0.5), t),
            ms(p99, t),
            ms(pct(&r.boundary, 1.0), t),
            met(matches!(p99, Some(Some(d)) if d < Duration::from_millis(limit)))
        );
    }
    println!("  the completion inserts the batch's job graph (one circuit of each basic type) in its transaction, which queues the round-0 proving jobs");

    println!("\n-- CPU per lease cycle, microseconds (utime + stime over the window / cycles) --");
    println!(
        "{:>6} {:>5} {:>10} {:>10} {:>10} {:>12} {:>12} {:>8} {:>12}",
        "depth", "N", "scheduler", "postgres", "total", "base pg", "base poller", "ratio", "fleet sim"
    );
    for r in rows {
        let Some(cycles) = r.cycles else { continue };
        let b = baseline_of(base, r.depth, r.n);
        let total = r.busy.scheduler + r.busy.postgres;
        let ratio = b.filter(|b| b.claims > 0 && cycles > 0).map(|b| (total / cycles as f64) / (b.busy.postgres / b.claims as f64));
        println!(
            "{:>6} {:>5} {:>10} {:>10} {:>10} {:>12} {:>12} {:>8} {:>12}",
            depth_name(r.depth),
            r.n,
            us_per(r.busy.scheduler, cycles),
            us_per(r.busy.postgres, cycles),
            us_per(total, cycles),
            b.map_or("-".into(), |b| us_per(b.busy.postgres, b.claims)),
            b.map_or("-".into(), |b| us_per(b.busy.bench, b.claims)),
            ratio.map_or("-".into(), |x| format!("{x:.2}x")),
            us_per(r.busy.bench, cycles),
        );
    }
    println!(
        "  ratio: (scheduler + postgres) per cycle / baseline postgres per claim; base poller and fleet sim: this bench's own process (pollers, simulated workers), for context; {cores} cores shared by all"
    );

    println!("\n-- idle cost: N connected idle workers, % of one core over {:.0} s --", plan.idle.as_secs_f64());
    println!(
        "{:>6} {:>5} {:>10} {:>10} {:>10} {:>10} {:>14} {:>7}   target: < 5% (N = 1,000)",
        "depth", "N", "scheduler", "postgres", "total", "base pg", "settled after", "other"
    );
    for r in rows.iter().chain(big) {
        let b = baseline_of(base, r.depth, r.n);
        let total = core_pct(r.idle.scheduler + r.idle.postgres, r.idle.wall);
        println!(
            "{:>6} {:>5} {:>10.2} {:>10.2} {:>10.2} {:>10} {:>14} {:>7}   {}",
            depth_name(r.depth),
            r.n,
            core_pct(r.idle.scheduler, r.idle.wall),
            core_pct(r.idle.postgres, r.idle.wall),
            total,
            b.map_or("-".into(), |b| format!("{:.2}", core_pct(b.idle.postgres, b.idle.wall))),
            format!("{:.1} s{}", r.settle.0.as_secs_f64(), if r.settle.1 { "" } else { " (cap)" }),
            format!("{:.0}%", core_pct(r.idle.other, r.idle.wall)),
            met(total < 5.0)
        );
    }
    println!("  settled after: wait until scheduler + postgres used < 25% of a core over 0.5 s (or the cap) before the idle window");

    println!("\n-- scheduler memory with N connected (VmRSS / VmHWM, MiB) --");
    for r in rows.iter().chain(big) {
        println!("{:>6} {:>5}   VmRSS {:>7.1}   VmHWM {:>7.1}", depth_name(r.depth), r.n, r.rss.0, r.rss.1);
    }
    if rows.iter().chain(big).any(|r| r.unmatched > 0) {
        println!("  WARNING: WVG leases that named no simulated prover: {:?}", rows.iter().chain(big).map(|r| r.unmatched).collect::<Vec<_>>());
    }

    println!("\n-- targets (issue 15) --");
    let n_top = *plan.ns.iter().max().unwrap_or(&0);
    let note = if n_top == 1000 { String::new() } else { format!(" (measured at N = {n_top}: the target is for 1,000)") };
    let at_top: Vec<&FleetRow> = rows.iter().filter(|r| r.n == n_top).collect();
    for r in &at_top {
        let f = r.cycles.map_or(0.0, |c| per_s(c, r.window));
        let b = baseline_of(base, r.depth, r.n).map_or(0.0, |b| per_s(b.claims, b.window));
        println!(
            "  lease cycles/s, depth {}, N {}: {f:.0}/s, {:.2}x baseline ({b:.0}/s)   target >= 10,000/s and >= 3x: {}{note}",
            depth_name(r.depth),
            r.n,
            f / b.max(1e-9),
            met(f >= 10_000.0 && f >= 3.0 * b)
        );
    }
    for r in &at_top {
        let p = pct(&r.dispatch, 0.99);
        println!(
            "  dispatch latency p99, depth {}, N {}: {} ms   target < 5 ms: {}{note}",
            depth_name(r.depth),
            r.n,
            ms(p, t),
            met(matches!(p, Some(Some(d)) if d < Duration::from_millis(5)))
        );
        let p = pct(&r.boundary, 0.99);
        println!(
            "  round boundary p99, depth {}, N {}: {} ms   target < 5 ms: {}{note}",
            depth_name(r.depth),
            r.n,
            ms(p, t),
            met(matches!(p, Some(Some(d)) if d < Duration::from_millis(5)))
        );
    }
    if let (Some(lo), Some(hi)) = (at_top.iter().min_by_key(|r| r.depth), at_top.iter().max_by_key(|r| r.depth)) {
        if lo.depth != hi.depth {
            for (name, a, b) in [("dispatch latency", &lo.dispatch, &hi.dispatch), ("round boundary", &lo.boundary, &hi.boundary)] {
                let (pa, pb) = (pct(a, 0.99), pct(b, 0.99));
                let ratio = match (pa, pb) {
                    (Some(Some(a)), Some(Some(b))) => Some(b.as_secs_f64() / a.as_secs_f64().max(1e-9)),
                    _ => None,
                };
                println!(
                    "  {name} p99 from {} to {} queued, N {n_top}: {} -> {} ms ({})   target within 2x: {}",
                    depth_name(lo.depth),
                    depth_name(hi.depth),
                    ms(pa, t),
                    ms(pb, t),
                    ratio.map_or("n/a".into(), |x| format!("{x:.2}x")),
                    met(ratio.is_some_and(|x| x <= 2.0))
                );
            }
        } else {
            println!("  latency from 10k to 1M queued: one depth only in this run (not evaluated)");
        }
    }
    for r in &at_top {
        let total = core_pct(r.idle.scheduler + r.idle.postgres, r.idle.wall);
        println!("  idle cost, depth {}, N {}: {total:.2}% of a core   target < 5%: {}{note}", depth_name(r.depth), r.n, met(total < 5.0));
    }
    match big {
        Some(r) => {
            let p = pct(&r.boundary, 0.99);
            println!(
                "  {} connected, depth {}: round boundary p99 {} ms   target < 10 ms: {}",
                r.n,
                depth_name(r.depth),
                ms(p, t),
                met(matches!(p, Some(Some(d)) if d < Duration::from_millis(10)))
            );
            println!("  {} connected: scheduler VmRSS {:.1} MiB   target < 300 MiB: {}", r.n, r.rss.0, met(r.rss.0 < 300.0));
        }
        None => println!("  3,000 connected workers: not run (--quick or --big-fleet 0)"),
    }
}

fn used_json(u: &Used) -> serde_json::Value {
    serde_json::json!({ "scheduler_cpu_secs": u.scheduler, "postgres_cpu_secs": u.postgres, "bench_cpu_secs": u.bench, "other_cpu_secs": u.other, "wall_secs": u.wall })
}

#[allow(clippy::too_many_arguments)]
fn summary(
    plan: &Plan,
    rows: &[FleetRow],
    big: Option<&FleetRow>,
    base: &[BaseRow],
    shown: &[(&str, String)],
    cores: usize,
    took: Duration,
    setup: Vec<serde_json::Value>,
) -> serde_json::Value {
    let fleet_json = |r: &FleetRow| {
        serde_json::json!({
            "depth": r.depth, "n": r.n,
            "roles": { "witness_generator": r.roles.0, "wvg": r.roles.1, "prover": r.roles.2 },
            "queued_at_start": { "fleet_classes": r.queued_cycle, "other_classes": r.queued_other },
            "connect_secs": r.connect.as_secs_f64(),
            "lease_cycles": r.cycles, "window_secs": r.window,
            "lease_cycles_per_sec": r.cycles.map(|c| per_s(c, r.window)),
            "recorded_per_sec": r.cycles.map(|_| per_s(r.recorded, r.window)),
            "window_cpu": used_json(&r.busy),
            "idle_cpu": used_json(&r.idle),
            "settle_secs": r.settle.0.as_secs_f64(), "settled": r.settle.1,
            "dispatch_ms": { "samples": r.dispatch.len(), "p50": ms_value(pct(&r.dispatch, 0.5)), "p99": ms_value(pct(&r.dispatch, 0.99)), "max": ms_value(pct(&r.dispatch, 1.0)), "early": r.early },
            "round_boundary_ms": { "samples": r.boundary.len(), "p50": ms_value(pct(&r.boundary, 0.5)), "p99": ms_value(pct(&r.boundary, 0.99)), "max": ms_value(pct(&r.boundary, 1.0)) },
            "scheduler_rss_mib": r.rss.0, "scheduler_hwm_mib": r.rss.1,
        })
    };
    serde_json::json!({
        "quick": plan.quick,
        "cores": cores,
        "postgres": shown.iter().map(|(k, v)| ((*k).to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
        "took_secs": took.as_secs_f64(),
        "setup": setup,
        "fleet": rows.iter().map(fleet_json).collect::<Vec<_>>(),
        "large_fleet": big.map(fleet_json),
        "baseline": base.iter().map(|b| serde_json::json!({
            "depth": b.depth, "n": b.n, "pool_connections": b.pool,
            "claims": b.claims, "window_secs": b.window, "claims_per_sec": per_s(b.claims, b.window),
            "window_cpu": used_json(&b.busy), "idle_cpu": used_json(&b.idle),
            "latency_ms": { "samples": b.latency.len(), "p50": ms_value(pct(&b.latency, 0.5)), "p99": ms_value(pct(&b.latency, 0.99)) },
        })).collect::<Vec<_>>(),
    })
}

/// The `SubmitBatch` of batch `b` at protocol version `0.minor.patch` (its file is never read:
/// the simulated witness generator completes at once).
fn submit_request(b: u32, minor: u16, patch: u16) -> v1::SubmitBatchRequest {
    v1::SubmitBatchRequest {
        batch_number: b,
        protocol_version: Some(v1::ProtocolVersion { minor: minor.into(), patch: patch.into() }),
        input_key: keys::batch_input(BatchNumber(b)),
        priority: 0,
        content_sha256: vec![],
    }
}
