//! The Era-style baseline: N pollers on a copy of the same queue (our `jobs` table and schema, in
//! a database of its own on the same server). Each loops: one claim
//!
//! ```sql
//! UPDATE jobs SET status = 'leased', ... WHERE id = (SELECT id FROM jobs WHERE status = 'queued'
//!     AND kind = $1 AND protocol_minor = $2 AND protocol_patch = $3 [AND pair = ANY($4)]
//!     ORDER BY urgency DESC, batch_number, aggregation_round DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED)
//! RETURNING id, input_key
//! ```
//!
//! (our lease order, read in order from the baseline's own index `queue::BASELINE_INDEX`), then
//! one completion (`UPDATE ... SET status = 'succeeded'`), each its own durable commit; a poller sleeps 1 s only when its claim finds nothing. Poller `i` takes the class of
//! fleet worker `i` (a prover polls as a WVG of its group and zone's version). The pollers share a
//! pool of min(N, 64) connections.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proofmesh_proto::v1::Role;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::queue::{group_pairs, CYCLE_PREFIX, VERSIONS};
use super::workers::member;

/// Connections the pollers share, at most.
pub const MAX_POOL: usize = 64;

/// Prefix of the latency samples' input keys.
pub const SAMPLE_PREFIX: &str = "fleet/sample/";

/// What the pollers share with the harness.
pub struct Shared {
    /// Cycle jobs claimed (and completed).
    pub claims: AtomicU64,
    /// Claims that found nothing.
    pub empty: AtomicU64,
    pub collect: AtomicBool,
    pub completed: Mutex<Vec<i64>>,
    events: mpsc::UnboundedSender<(Instant, i64)>,
}

/// N pollers running.
pub struct Pollers {
    pub shared: Arc<Shared>,
    pub pool: PgPool,
    pub connections: usize,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Class {
    kind: &'static str,
    minor: i32,
    patch: i32,
    pairs: Option<Vec<i32>>,
}

fn class_of(i: usize) -> Class {
    let m = member(i);
    let (minor, patch) = VERSIONS[m.version];
    let (minor, patch) = (i32::from(minor), i32::from(patch));
    match m.role {
        Role::WitnessGenerator => Class { kind: "witness_generation", minor, patch, pairs: None },
        _ => Class { kind: "proving", minor, patch, pairs: Some(group_pairs(m.group.unwrap_or(0))) },
    }
}

const CLAIM_ANY: &str = "UPDATE jobs SET status = 'leased', attempts = attempts + 1, leased_to = $4, lease_id = gen_random_uuid(),
        leased_at = now(), lease_deadline = now() + interval '30 seconds'
    WHERE id = (SELECT id FROM jobs WHERE status = 'queued' AND kind = $1 AND protocol_minor = $2 AND protocol_patch = $3
                ORDER BY urgency DESC, batch_number, aggregation_round DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING id, input_key";
const CLAIM_PAIRS: &str = "UPDATE jobs SET status = 'leased', attempts = attempts + 1, leased_to = $4, lease_id = gen_random_uuid(),
        leased_at = now(), lease_deadline = now() + interval '30 seconds'
    WHERE id = (SELECT id FROM jobs WHERE status = 'queued' AND kind = $1 AND protocol_minor = $2 AND protocol_patch = $3
                  AND (aggregation_round * 256 + circuit_id) = ANY($5)
                ORDER BY urgency DESC, batch_number, aggregation_round DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING id, input_key";
const COMPLETE: &str = "UPDATE jobs SET status = 'succeeded', finished_at = now(), lease_deadline = NULL WHERE id = $1 AND status = 'leased'";

async fn poll(i: usize, pool: PgPool, shared: Arc<Shared>, stop: CancellationToken) {
    let class = class_of(i);
    let name = format!("era-poller-{i}");
    while !stop.is_cancelled() {
        let q = sqlx::query_as::<_, (i64, Option<String>)>(if class.pairs.is_some() { CLAIM_PAIRS } else { CLAIM_ANY })
            .bind(class.kind)
            .bind(class.minor)
            .bind(class.patch)
            .bind(&name);
        let q = match &class.pairs {
            Some(pairs) => q.bind(pairs.clone()),
            None => q,
        };
        let claim = q.fetch_optional(&pool).await;
        match claim {
            Ok(Some((id, key))) => {
                let key = key.unwrap_or_default();
                if key.starts_with(SAMPLE_PREFIX) {
                    let _ = shared.events.send((Instant::now(), id));
                }
                if let Err(e) = sqlx::query(COMPLETE).bind(id).execute(&pool).await {
                    eprintln!("baseline poller {i}: completing job {id}: {e}");
                }
                if key.starts_with(CYCLE_PREFIX) {
                    shared.claims.fetch_add(1, Ordering::Relaxed);
                    if shared.collect.load(Ordering::Relaxed) {
                        shared.completed.lock().expect("poisoned").push(id);
                    }
                }
            }
            Ok(None) => {
                shared.empty.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => {}
                }
            }
            Err(e) => {
                if stop.is_cancelled() {
                    return;
                }
                eprintln!("baseline poller {i}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Pollers {
    /// Starts `n` pollers on the database at `url`.
    pub async fn start(url: &str, n: usize) -> anyhow::Result<(Pollers, mpsc::UnboundedReceiver<(Instant, i64)>)> {
        let connections = n.clamp(1, MAX_POOL);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(connections as u32)
            .min_connections(connections as u32)
            .acquire_timeout(Duration::from_secs(120))
            .connect(url)
            .await?;
        // Open every connection before the clock starts.
        let mut held = vec![];
        for _ in 0..connections {
            held.push(pool.acquire().await?);
        }
        drop(held);
        let (events, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            claims: AtomicU64::new(0),
            empty: AtomicU64::new(0),
            collect: AtomicBool::new(false),
            completed: Mutex::default(),
            events,
        });
        let stop = CancellationToken::new();
        let tasks = (0..n).map(|i| tokio::spawn(poll(i, pool.clone(), shared.clone(), stop.clone()))).collect();
        Ok((Pollers { shared, pool, connections, stop, tasks }, rx))
    }

    /// Stops every poller and closes the pool.
    pub async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        self.pool.close().await;
    }
}

/// Inserts one latency sample job (a round-0 witness generation of version `version`, in the
/// first queue batch of that version) and returns its id, committed.
pub async fn insert_sample(c: &mut sqlx::PgConnection, k: u32, version: usize) -> anyhow::Result<i64> {
    let (minor, patch) = VERSIONS[version];
    let batch = i64::from(super::queue::DEPTH_BASE) + version as i64;
    Ok(sqlx::query_scalar(
        "INSERT INTO jobs (batch_number, kind, aggregation_round, circuit_id, depth, sequence_number, status, max_attempts,
                           priority, protocol_minor, protocol_patch, input_key, queued_at, urgency)
         VALUES ($1, 'witness_generation', 0, 0, 0, $2, 'queued', 3, 0, $3, $4, $5, now(), -extract(epoch FROM now())::float8)
         RETURNING id",
    )
    .bind(batch)
    .bind(200_000_000 + k as i32)
    .bind(i32::from(minor))
    .bind(i32::from(patch))
    .bind(format!("{SAMPLE_PREFIX}{k}"))
    .fetch_one(c)
    .await?)
}
