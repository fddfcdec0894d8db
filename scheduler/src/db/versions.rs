//! The protocol versions the scheduler knows (`protocol_versions`): what `Admin` lists, registers
//! and retires, and what a batch submission and a worker's registration are checked against.

use const_format::formatcp;
use crate::job_state::lit::{PROVING, QUEUED};
use sqlx::PgPool;

use super::DbError;

/// A protocol version with what waits on it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct VersionRow {
    /// Minor.
    pub minor: i32,
    /// Patch.
    pub patch: i32,
    /// The final circuit's verification key hash, 64 hex digits ('' until recorded).
    pub vk_hash: String,
    /// `active` or `retired`.
    pub status: String,
    /// Unix milliseconds.
    pub registered_ms: i64,
    /// Its batches still proving.
    pub unfinished_batches: i64,
    /// Its jobs queued now.
    pub queued_jobs: i64,
}

const COLUMNS: &str = formatcp!("v.minor, v.patch, v.vk_hash, v.status, (extract(epoch FROM v.registered_at) * 1000)::bigint AS registered_ms,
     (SELECT count(*) FROM batches b WHERE b.protocol_minor = v.minor AND b.protocol_patch = v.patch
                                     AND b.status = {PROVING}) AS unfinished_batches,
     (SELECT count(*) FROM jobs j WHERE j.protocol_minor = v.minor AND j.protocol_patch = v.patch
                                  AND j.status = {QUEUED}) AS queued_jobs");

/// Every known version, oldest first.
pub async fn protocol_versions(pool: &PgPool) -> Result<Vec<VersionRow>, DbError> {
    let sql = format!("SELECT {COLUMNS} FROM protocol_versions v ORDER BY v.minor, v.patch");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await?)
}

/// Every known version as `(minor, patch)`, active or retired: what a worker may declare. One
/// read of the small table (no counts), for registrations.
pub async fn known_versions<'c>(ex: impl sqlx::PgExecutor<'c>) -> Result<Vec<(i32, i32)>, DbError> {
    Ok(sqlx::query_as("SELECT minor, patch FROM protocol_versions").fetch_all(ex).await?)
}

async fn version(pool: &PgPool, minor: i32, patch: i32) -> Result<Option<VersionRow>, DbError> {
    let sql = format!("SELECT {COLUMNS} FROM protocol_versions v WHERE v.minor = $1 AND v.patch = $2");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(minor).bind(patch).fetch_optional(pool).await?)
}

/// Registers a version as active (a retired one is reactivated), recording `vk_hash` (lowercase
/// hex) where none was. Errors: [`DbError::Refused`] when it is known with another hash.
pub async fn register_version(pool: &PgPool, minor: i32, patch: i32, vk_hash: &str) -> Result<VersionRow, DbError> {
    let stored: Option<String> = sqlx::query_scalar(
        "INSERT INTO protocol_versions AS v (minor, patch, vk_hash) VALUES ($1, $2, $3)
         ON CONFLICT (minor, patch) DO UPDATE
             SET status = 'active', retired_at = NULL, vk_hash = CASE WHEN v.vk_hash = '' THEN $3 ELSE v.vk_hash END
             WHERE v.vk_hash = '' OR v.vk_hash = $3 OR $3 = ''
         RETURNING vk_hash",
    )
    .bind(minor)
    .bind(patch)
    .bind(vk_hash)
    .fetch_optional(pool)
    .await?;
    if stored.is_none() {
        let row = version(pool, minor, patch).await?;
        return Err(DbError::Refused(format!(
            "protocol version 0.{minor}.{patch} is registered with verification key hash {}, not {vk_hash}",
            row.map(|r| r.vk_hash).unwrap_or_default()
        )));
    }
    version(pool, minor, patch).await?.ok_or_else(|| DbError::Invalid(format!("version 0.{minor}.{patch} vanished")))
}

/// Retires a version: new batches of it are refused, its unfinished ones still prove. `None`: unknown.
pub async fn retire_version(pool: &PgPool, minor: i32, patch: i32) -> Result<Option<VersionRow>, DbError> {
    sqlx::query(
        "UPDATE protocol_versions SET status = 'retired', retired_at = COALESCE(retired_at, now())
         WHERE minor = $1 AND patch = $2",
    )
    .bind(minor)
    .bind(patch)
    .execute(pool)
    .await?;
    version(pool, minor, patch).await
}
