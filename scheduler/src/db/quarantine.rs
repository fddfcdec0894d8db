//! Quarantine: worker names that handed in proofs that do not verify, and their strikes.

use super::*;

/// Whether worker name `name` is quarantined.
pub async fn is_quarantined(pool: &PgPool, name: &str) -> Result<bool, DbError> {
    Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM quarantined_workers WHERE worker_name = $1)").bind(name).fetch_one(pool).await?)
}

/// Lifts `name`'s quarantine. Returns whether it was quarantined.
pub async fn release_worker(pool: &PgPool, name: &str) -> Result<bool, DbError> {
    Ok(sqlx::query("DELETE FROM quarantined_workers WHERE worker_name = $1").bind(name).execute(pool).await?.rows_affected() > 0)
}

/// Strikes per worker name, for `names`.
pub async fn strikes(pool: &PgPool, names: &[String]) -> Result<Vec<(String, i64)>, DbError> {
    Ok(sqlx::query_as("SELECT worker_name, count(*) FROM strikes WHERE worker_name = ANY($1) GROUP BY worker_name")
        .bind(names)
        .fetch_all(pool)
        .await?)
}
