//! The queue: a fresh database with our schema (the scheduler's migrations), the protocol
//! versions, and `depth` queued jobs inserted set-based (`INSERT ... SELECT generate_series`).
//!
//! Jobs come in batches of 100 (`DEPTH_BASE + i`), one protocol version per batch, cycling
//! through 0.1.0, 0.2.0 (the fleet's two versions) and 0.0.1 (a version no bench worker
//! declares). Older batches are more urgent (the lease order), so every class is spread evenly
//! through the order. In a batch of a fleet version, 15 of the 100 jobs are of classes the fleet
//! takes (the *cycle* jobs: 4 leaf witness generations, 6 round-0 proving jobs of group 0, 5
//! proving jobs of group 1) and 85 are not (80 proving jobs of pairs no prover group covers, 5
//! compression jobs: no compressor in the fleet); a batch of 0.0.1 is all other classes. So 10%
//! of the queue is the fleet's and 90% is what the lease statement must look past.
//!
//! The cycle jobs are inserted parked (`waiting`, no inputs) and queued only for a throughput
//! window ([`start_cycle`]); during it every cycle job completed is queued again at the same
//! place in the order (a copy with a new sequence number: [`Requeue`]), so the queue keeps its
//! depth and mix; those statements run on a harness connection whose backend is left out of the
//! CPU figures. After the window the cycle jobs still queued are parked again ([`park_cycle`]),
//! so the idle and latency measurements see only other classes (90% of the depth).

use sqlx::{Connection, Executor, PgConnection};

/// First batch number of the queue's batches.
pub const DEPTH_BASE: u32 = 1_000_000;
/// First batch number of the latency samples (`SubmitBatch`).
pub const SAMPLE_BASE: u32 = 500_000;
/// Jobs per queue batch.
const PER_BATCH: i64 = 100;
/// The fleet's two protocol versions and the one nobody proves.
pub const VERSIONS: [(u16, u16); 2] = [(1, 0), (2, 0)];
pub const OTHER_VERSION: (u16, u16) = (0, 1);
/// `input_key` prefix of the cycle jobs (the fleet's classes).
pub const CYCLE_PREFIX: &str = "fleet/cycle/";

/// The prover groups file: group 0 takes rounds 0 and 1, group 1 rounds 2 to 4 (circuit 7,
/// which the queue's other-class jobs use, is in no group).
pub const GROUPS_TOML: &str = "\
[[group]]
id = 0
circuits = [
  { aggregation_round = 0, circuit_id = 1 }, { aggregation_round = 0, circuit_id = 2 }, { aggregation_round = 0, circuit_id = 3 },
  { aggregation_round = 1, circuit_id = 1 }, { aggregation_round = 1, circuit_id = 2 }, { aggregation_round = 1, circuit_id = 3 },
]

[[group]]
id = 1
circuits = [
  { aggregation_round = 2, circuit_id = 1 }, { aggregation_round = 2, circuit_id = 2 }, { aggregation_round = 2, circuit_id = 3 },
  { aggregation_round = 3, circuit_id = 0 }, { aggregation_round = 4, circuit_id = 0 },
]
";

/// Packed pairs (`round * 256 + circuit`) of group `g`, as the baseline's pollers filter.
pub fn group_pairs(g: u32) -> Vec<i32> {
    match g {
        0 => vec![1, 2, 3, 257, 258, 259],
        _ => vec![513, 514, 515, 768, 1024],
    }
}

/// Creates database `name` on `admin`'s server, applies the scheduler's migrations and
/// registers the versions (as `Admin.RegisterProtocolVersion` would: the batches' foreign key
/// needs them before the scheduler runs).
pub async fn create(admin: &mut PgConnection, base_url: &str, name: &str) -> anyhow::Result<()> {
    admin.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}"))).await?;
    admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await?;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&format!("{base_url}/{name}")).await?;
    proofmesh_scheduler::migrate(&pool).await?;
    for (minor, patch) in VERSIONS.iter().chain([&OTHER_VERSION]) {
        // What Admin.RegisterProtocolVersion records (no verification key hash).
        sqlx::query("INSERT INTO protocol_versions (minor, patch) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(i32::from(*minor))
            .bind(i32::from(*patch))
            .execute(&pool)
            .await?;
    }
    pool.close().await;
    Ok(())
}

/// Inserts `depth` queued jobs (see the module comment) into the database at `url`. The
/// secondary indexes of `jobs` are dropped for the insert and built again from their own
/// definitions, and foreign-key triggers are skipped for this session (the rows are consistent
/// by construction): a bulk load as an operator would do it. Ends with `ANALYZE`.
pub async fn populate(url: &str, depth: u64) -> anyhow::Result<()> {
    let mut c = PgConnection::connect(url).await?;
    let batches = (depth as i64 + PER_BATCH - 1) / PER_BATCH;
    // batches.geometry: state_tree_depth, tx_chunk, vm_chunk, storage_chunk, leaf_fan_in, node_fan_in, max_node_depth.
    let g = proofmesh_core::Geometry::small();
    let geometry: Vec<i32> = proofmesh_scheduler::db::geometry_to_row(&g);
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT indexname::text, indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename = 'jobs'
           AND indexname NOT IN (SELECT conname FROM pg_constraint WHERE conrelid = 'jobs'::regclass)",
    )
    .fetch_all(&mut c)
    .await?;
    let mut tx = c.begin().await?;
    tx.execute("SET LOCAL session_replication_role = replica").await?;
    for (name, _) in &indexes {
        tx.execute(sqlx::AssertSqlSafe(format!("DROP INDEX {name}"))).await?;
    }
    let (v1, v2, v3) = (VERSIONS[0], VERSIONS[1], OTHER_VERSION);
    sqlx::query(
        "INSERT INTO batches (batch_number, protocol_minor, protocol_patch, geometry, status, input_key, priority, created_at)
         SELECT $1 + i,
                CASE i % 3 WHEN 0 THEN $3 WHEN 1 THEN $5 ELSE $7 END,
                CASE i % 3 WHEN 0 THEN $4 WHEN 1 THEN $6 ELSE $8 END,
                $9, 'proving', 'fleet/batch/' || i, 0, now() - make_interval(secs => ($2 - i)::float8)
         FROM generate_series(0, $2 - 1) i",
    )
    .bind(i64::from(DEPTH_BASE))
    .bind(batches)
    .bind(i32::from(v1.0))
    .bind(i32::from(v1.1))
    .bind(i32::from(v2.0))
    .bind(i32::from(v2.1))
    .bind(i32::from(v3.0))
    .bind(i32::from(v3.1))
    .bind(&geometry)
    .execute(&mut *tx)
    .await?;
    // k = position in the batch; fleet = a batch of one of the fleet's versions.
    sqlx::query(
        "WITH s AS (SELECT g, g % 100 AS k, (g / 100) % 3 < 2 AS fleet, $1 + g / 100 AS batch FROM generate_series(0, $2 - 1) g),
              c AS (SELECT g, batch, k, fleet,
                           CASE WHEN k >= 95 THEN 'compression'
                                WHEN (fleet AND k < 4) OR (NOT fleet AND k < 15) THEN 'witness_generation'
                                ELSE 'proving' END AS kind,
                           CASE WHEN k >= 95 THEN 5
                                WHEN fleet AND k < 4 THEN 1
                                WHEN fleet AND k < 10 THEN 0
                                WHEN fleet AND k < 13 THEN 2
                                WHEN fleet AND k = 13 THEN 3
                                WHEN fleet AND k = 14 THEN 4
                                WHEN fleet THEN k % 3
                                WHEN k < 15 THEN 1
                                ELSE 0 END AS round,
                           CASE WHEN k >= 95 THEN 0
                                WHEN fleet AND k < 4 THEN 1 + k % 3
                                WHEN fleet AND k < 10 THEN 1 + (k - 4) % 3
                                WHEN fleet AND k < 13 THEN 1 + (k - 10)
                                WHEN fleet AND k < 15 THEN 0
                                WHEN fleet THEN 7
                                ELSE 1 + k % 3 END AS circuit,
                           fleet AND k < 15 AS cycle
                    FROM s)
         INSERT INTO jobs (batch_number, kind, aggregation_round, circuit_id, depth, sequence_number, status, attempts,
                           max_attempts, priority, protocol_minor, protocol_patch, input_key, output_key, queued_at,
                           weight_mib, urgency)
         SELECT c.batch, c.kind, c.round, c.circuit, 0, c.g, CASE WHEN c.cycle THEN 'waiting' ELSE 'queued' END, 0, 3, 0,
                b.protocol_minor, b.protocol_patch, CASE WHEN c.cycle THEN $3 ELSE 'fleet/other/' END || c.g, 'fleet/out/' || c.g,
                CASE WHEN c.cycle THEN NULL ELSE now() END, 0,
                b.priority * 300 - extract(epoch FROM b.created_at)::float8
         FROM c JOIN batches b ON b.batch_number = c.batch",
    )
    .bind(i64::from(DEPTH_BASE))
    .bind(depth as i64)
    .bind(CYCLE_PREFIX)
    .execute(&mut *tx)
    .await?;
    for (_, def) in &indexes {
        tx.execute(sqlx::AssertSqlSafe(def.clone())).await?;
    }
    tx.commit().await?;
    c.execute("ANALYZE").await?;
    c.close().await?;
    Ok(())
}

/// Queued jobs by class: (the fleet's, other classes).
pub async fn queued(c: &mut PgConnection) -> anyhow::Result<(i64, i64)> {
    let (cycle, other): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE input_key LIKE 'fleet/cycle/%'), count(*) FILTER (WHERE input_key NOT LIKE 'fleet/cycle/%' OR input_key IS NULL)
         FROM jobs WHERE status = 'queued'",
    )
    .fetch_one(c)
    .await?;
    Ok((cycle, other))
}

/// Queues the parked cycle jobs (before a throughput window).
pub async fn start_cycle(c: &mut PgConnection) -> anyhow::Result<u64> {
    Ok(sqlx::query(
        "UPDATE jobs SET status = 'queued', queued_at = now() WHERE status = 'waiting' AND input_key LIKE 'fleet/cycle/%'",
    )
    .execute(c)
    .await?
    .rows_affected())
}

/// Parks the cycle jobs still queued (`waiting`, with no inputs: nothing queues them but
/// [`start_cycle`]), so only other classes stay queued for the idle measurements and the next
/// fleet finds the same queue.
/// The scheduler may be leasing meanwhile: rows it holds are skipped (`SKIP LOCKED`) and the
/// statement repeats until none of the fleet's jobs is queued, so the harness never waits on (or
/// deadlocks with) the scheduler's transactions.
pub async fn park_cycle(c: &mut PgConnection) -> anyhow::Result<u64> {
    let mut parked = 0;
    for _ in 0..200 {
        let r = sqlx::query(
            "UPDATE jobs SET status = 'waiting', queued_at = NULL
             WHERE id IN (SELECT id FROM jobs WHERE status = 'queued' AND input_key LIKE 'fleet/cycle/%' FOR UPDATE SKIP LOCKED)",
        )
        .execute(&mut *c)
        .await;
        match r {
            Ok(r) => parked += r.rows_affected(),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("40P01") => {}
            Err(e) => return Err(e.into()),
        }
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'queued' AND input_key LIKE 'fleet/cycle/%'")
            .fetch_one(&mut *c)
            .await?;
        if left == 0 {
            return Ok(parked);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    anyhow::bail!("the fleet's jobs could not be parked: the scheduler kept leasing them")
}

/// A job by its identity (the unique key), as a lease names it.
#[derive(Debug, Clone)]
pub struct JobKey {
    pub batch: i64,
    pub kind: &'static str,
    pub round: i16,
    pub circuit: i16,
    pub depth: i16,
    pub seq: i32,
}

/// Queues copies of completed cycle jobs at their places in the order (same batch, class and
/// urgency; a new sequence number), on its own connection.
pub struct Requeue {
    conn: PgConnection,
    next_seq: i32,
    /// The connection's backend pid (left out of the CPU figures).
    pub backend: i32,
}

/// The statement that queues a fresh copy of each job `j` of `from` (which numbers them
/// `k.ord`), at sequence numbers from the parameter `base` on (so the copies are new jobs).
fn copy_sql(base: &str, from: &str) -> String {
    format!(
        "INSERT INTO jobs (batch_number, kind, aggregation_round, circuit_id, depth, sequence_number, status, attempts,
                           max_attempts, priority, protocol_minor, protocol_patch, input_key, output_key, queued_at,
                           weight_mib, urgency)
         SELECT j.batch_number, j.kind, j.aggregation_round, j.circuit_id, j.depth, {base} + k.ord::int, 'queued', 0,
                j.max_attempts, j.priority, j.protocol_minor, j.protocol_patch, j.input_key, j.output_key, now(),
                j.weight_mib, j.urgency
         FROM {from}"
    )
}

impl Requeue {
    /// On a new connection to `url`.
    pub async fn connect(url: &str) -> anyhow::Result<Requeue> {
        let mut conn = PgConnection::connect(url).await?;
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut conn).await?;
        Ok(Requeue { conn, next_seq: 100_000_000, backend })
    }

    /// Copies of the jobs named by `keys` (fleet: the identities its leases carried).
    pub async fn by_key(&mut self, keys: &[JobKey]) -> anyhow::Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        let base = self.next_seq;
        self.next_seq += keys.len() as i32;
        let n = sqlx::query(sqlx::AssertSqlSafe(copy_sql(
            "$7",
            "unnest($1::bigint[], $2::text[], $3::smallint[], $4::smallint[], $5::smallint[], $6::int[])
                  WITH ORDINALITY AS k(b, kind, r, c, d, s, ord)
             JOIN jobs j ON j.batch_number = k.b AND j.kind = k.kind AND j.aggregation_round = k.r
                        AND j.circuit_id = k.c AND j.depth = k.d AND j.sequence_number = k.s",
        )))
        .bind(keys.iter().map(|k| k.batch).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.kind.to_string()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.round).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.circuit).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.depth).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.seq).collect::<Vec<_>>())
        .bind(base)
        .execute(&mut self.conn)
        .await?
        .rows_affected();
        Ok(n)
    }

    /// Copies of the jobs `ids` (the baseline: its pollers know the ids they claimed).
    pub async fn by_id(&mut self, ids: &[i64]) -> anyhow::Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let base = self.next_seq;
        self.next_seq += ids.len() as i32;
        let n = sqlx::query(sqlx::AssertSqlSafe(copy_sql("$2", "unnest($1::bigint[]) WITH ORDINALITY AS k(id, ord) JOIN jobs j ON j.id = k.id")))
        .bind(ids)
        .bind(base)
        .execute(&mut self.conn)
        .await?
        .rows_affected();
        Ok(n)
    }

    /// The connection, for harness statements outside the measured windows.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

/// The baseline's own index for its claim: its equality filters (kind, protocol version), then
/// the lease order, over queued jobs, so a claim reads its class in order as Era's indexed
/// claim does (the scheduler's indexes are shaped for the scheduler's statements).
pub const BASELINE_INDEX: &str = "CREATE INDEX era_claim_order ON jobs (kind, protocol_minor, protocol_patch, urgency DESC, batch_number, aggregation_round DESC, id)
     WHERE status = 'queued'";
