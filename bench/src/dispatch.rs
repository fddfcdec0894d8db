//! Dispatch latency: an idle worker (the real lease client, over TCP) waits; a job becomes ready
//! (the same insert `SubmitBatch` does, then the same wake-up); the time until the lease reaches
//! the worker is one sample. Jobs are made ready one at a time, so the worker is always idle.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proofmesh_core::{keys, BatchNumber, Geometry, LocalStore};
use proofmesh_proto::v1::Role;
use proofmesh_scheduler::graph::JobKind;
use proofmesh_scheduler::{db, Policy, MaxAttempts, Settings, Shared, ZonePolicy};
use proofmesh_worker::lease::{LeaseClient, Registration};
use tokio_util::sync::CancellationToken;

/// A fresh database on `DATABASE_URL`'s server, migrated.
pub async fn fresh_pool() -> anyhow::Result<sqlx::PgPool> {
    let url = std::env::var("DATABASE_URL").map_err(|_| anyhow::anyhow!("DATABASE_URL is not set (use scripts/with-postgres.sh)"))?;
    let admin = sqlx::PgPool::connect(&url).await?;
    let name = format!("proofmesh_bench_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await?;
    let (base, _) = url.rsplit_once('/').ok_or_else(|| anyhow::anyhow!("DATABASE_URL has no database name"))?;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(&format!("{base}/{name}")).await?;
    proofmesh_scheduler::migrate(&pool).await?;
    Ok(pool)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Lease throughput: `jobs` jobs queued at once (plus as many of another kind, so the lease
/// statement sorts a real queue), then the dispatcher's own loop leases them all, one statement
/// per grant; leases are ended as soon as they are granted, so the worker never waits for a
/// credit. Prints leases per second.
async fn throughput(pool: &sqlx::PgPool, settings: &Settings, jobs: usize) -> anyhow::Result<()> {
    let base = 1_000_000u32;
    for i in 0..(2 * jobs) as u32 {
        let batch = BatchNumber(base + i);
        db::submit_batch(pool, &crate::affinity::new_batch(batch, &keys::batch_input(batch), (i % 3) as i32), &Geometry::small(), settings).await?;
    }
    // Half of them become compression jobs (another queue in the same table).
    sqlx::query("UPDATE jobs SET kind = 'compression' WHERE batch_number >= $1 AND batch_number % 2 = 1")
        .bind(i64::from(base))
        .execute(pool)
        .await?;
    let mut in_lease = Duration::ZERO;
    let mut leased = 0usize;
    while leased < jobs {
        let start = Instant::now();
        let job = db::lease(pool, &db::LeaseAsk::plain(JobKind::WitnessGeneration, "bench", 60.0, &settings.policy)).await?;
        in_lease += start.elapsed();
        let Some(job) = job else { anyhow::bail!("queue ran dry after {leased} leases") };
        // Finish it outside the measurement, so the queue shrinks as in a real run.
        sqlx::query("UPDATE jobs SET status = 'succeeded', lease_deadline = NULL WHERE id = $1").bind(job.id).execute(pool).await?;
        leased += 1;
    }
    let secs = in_lease.as_secs_f64();
    println!(
        "lease throughput: {leased} lease statements from a queue of {} jobs (two kinds, three priorities): \
         {:.0} leases/s ({:.3} ms per statement; the dispatcher runs them one after another)",
        2 * jobs,
        leased as f64 / secs,
        secs * 1e3 / leased as f64
    );
    Ok(())
}

/// The scheduler's settings for the benchmarks: `geometry`, defaults otherwise.
pub fn settings(geometry: Geometry) -> Settings {
    Settings {
        geometry,
        lease_secs: 60.0,
        reconnect_grace_secs: 10.0,
        max_attempts: MaxAttempts::uniform(3),
        max_lease_age: Default::default(),
        max_worker_capacity: 64,
        zone_policy: ZonePolicy::SameZoneOnly,
        heartbeat_ms: 10_000,
        prover_groups: None,
        policy: Policy::default(),
        housekeeping: None,
        grpc: Default::default(),
        db_pass_deadline: proofmesh_scheduler::DB_PASS_DEADLINE,
        tls: Default::default(),
        access: Default::default(),
        quarantine_after_strikes: 1,
    }
}

/// Measures `jobs` dispatches and prints p50/p99/max.
pub async fn run(jobs: usize) -> anyhow::Result<()> {
    let pool = fresh_pool().await?;
    let data = tempfile::tempdir()?;
    let shared = Shared::new(pool.clone(), settings(Geometry::small()), Arc::new(LocalStore::new(data.path())));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let cancel = CancellationToken::new();
    tokio::spawn(proofmesh_scheduler::serve(shared.clone(), listener, cancel.clone()));

    let reg = Registration {
        scheduler: url,
        role: Role::WitnessGenerator,
        name: "bench".into(),
        zone: "a".into(),
        region: "a".into(),
        host: "h".into(),
        capacity: 1,
        prover_endpoint: String::new(),
        protocol_versions: vec![],
        prover_group: None,
        memory_budget_mib: 0,
        tls: Default::default(),
    };
    let (client, mut leases) = LeaseClient::start(reg, cancel.clone());
    while client.worker_id().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the registration's credit land before the first sample.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let warmup = 50;
    let mut samples = Vec::with_capacity(jobs);
    for i in 0..(warmup + jobs) {
        let batch = BatchNumber(i as u32 + 1);
        db::submit_batch(&pool, &crate::affinity::new_batch(batch, &keys::batch_input(batch), 0), &Geometry::small(), &shared.settings).await?;
        let ready = Instant::now();
        shared.wake_dispatcher();
        let lease = tokio::time::timeout(Duration::from_secs(5), leases.recv())
            .await
            .map_err(|_| anyhow::anyhow!("no lease within 5 s"))?
            .ok_or_else(|| anyhow::anyhow!("lease stream ended"))?;
        let latency = ready.elapsed();
        anyhow::ensure!(lease.job.map(|j| j.batch_number) == Some(batch.0), "leased another job");
        if i >= warmup {
            samples.push(latency);
        }
        // A no-op job: free the slot (one more credit) without doing anything.
        client.release(&lease.lease_id);
    }
    cancel.cancel();
    throughput(&pool, &shared.settings, jobs).await?;
    samples.sort();
    let (p50, p99, max) = (percentile(&samples, 0.50), percentile(&samples, 0.99), *samples.last().unwrap());
    println!(
        "dispatch latency over {jobs} no-op jobs (ready -> lease at an idle worker, gRPC over loopback, PostgreSQL):\n  \
         p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms   target p99 < 5 ms: {}",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        if p99 < Duration::from_millis(5) { "met" } else { "NOT met" }
    );
    Ok(())
}
