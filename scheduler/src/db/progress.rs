//! Batch reads: status and per-round progress.

use const_format::formatcp;
use crate::job_state::lit::{FAILED, LEASED, QUEUED, SUCCEEDED};
use super::*;

/// Per-round progress of a batch.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RoundRow {
    /// 0..=5.
    pub aggregation_round: i16,
    /// Proving (or compression) jobs.
    pub total: i64,
    /// Succeeded.
    pub succeeded: i64,
    /// Failed.
    pub failed: i64,
    /// Leased now.
    pub in_progress: i64,
    /// Queued now.
    pub queued: i64,
}

/// A batch row with its progress.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BatchRow {
    /// Batch number.
    pub batch_number: i64,
    /// `proving`, `proven` or `failed`.
    pub status: String,
    /// Protocol version, minor.
    pub protocol_minor: i32,
    /// Protocol version, patch.
    pub protocol_patch: i32,
    /// The final proof's artifact key once proven.
    pub proof_key: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Unix milliseconds.
    pub created_ms: i64,
    /// Unix milliseconds, once proven or failed.
    pub finished_ms: Option<i64>,
    /// Sum of the compute seconds workers reported for its jobs.
    pub compute_secs: f64,
}

const BATCH_COLUMNS: &str = "b.batch_number, b.status, b.protocol_minor, b.protocol_patch, b.proof_key, b.error,
     (extract(epoch FROM b.created_at) * 1000)::bigint AS created_ms,
     (extract(epoch FROM b.finished_at) * 1000)::bigint AS finished_ms,
     COALESCE((SELECT sum(compute_secs) FROM jobs j WHERE j.batch_number = b.batch_number), 0)::float8 AS compute_secs";

/// One batch, or `None`.
pub async fn batch(pool: &PgPool, batch: i64) -> Result<Option<BatchRow>, DbError> {
    let sql = format!("SELECT {BATCH_COLUMNS} FROM batches b WHERE b.batch_number = $1");
    Ok(sqlx::query_as::<_, BatchRow>(sqlx::AssertSqlSafe(sql)).bind(batch).fetch_optional(pool).await?)
}

/// The newest `limit` batches, newest first.
pub async fn batches(pool: &PgPool, limit: i64) -> Result<Vec<BatchRow>, DbError> {
    let sql = format!("SELECT {BATCH_COLUMNS} FROM batches b ORDER BY b.batch_number DESC LIMIT $1");
    Ok(sqlx::query_as::<_, BatchRow>(sqlx::AssertSqlSafe(sql)).bind(limit).fetch_all(pool).await?)
}

/// Proving and compression jobs of a batch by round.
pub async fn rounds(pool: &PgPool, batch: i64) -> Result<Vec<RoundRow>, DbError> {
    Ok(sqlx::query_as::<_, RoundRow>(
        formatcp!("SELECT aggregation_round, count(*) AS total,
                count(*) FILTER (WHERE status = {SUCCEEDED}) AS succeeded,
                count(*) FILTER (WHERE status = {FAILED}) AS failed,
                count(*) FILTER (WHERE status = {LEASED}) AS in_progress,
                count(*) FILTER (WHERE status = {QUEUED}) AS queued
         FROM jobs WHERE batch_number = $1 AND kind <> 'witness_generation'
         GROUP BY aggregation_round ORDER BY aggregation_round"),
    )
    .bind(batch)
    .fetch_all(pool)
    .await?)
}

