//! Quarantine and operator drains, by worker name: names that handed in proofs that do not
//! verify (their strikes), and names an operator drained. Both are kept in PostgreSQL, so neither
//! a reconnect nor a scheduler restart undoes them; `Admin.ReleaseWorker` lifts both.

use super::*;

/// Whether worker name `name` is `(quarantined, drained by an operator)`.
pub async fn holds<'c>(ex: impl sqlx::PgExecutor<'c>, name: &str) -> Result<(bool, bool), DbError> {
    Ok(sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM quarantined_workers WHERE worker_name = $1),
                EXISTS (SELECT 1 FROM drained_workers WHERE worker_name = $1)",
    )
    .bind(name)
    .fetch_one(ex)
    .await?)
}

/// Keeps worker name `name` drained (an operator's `DrainWorker`); `identity`: its connections'
/// certificate identity, for operators. Draining a drained name again changes nothing.
pub async fn drain_worker(pool: &PgPool, name: &str, identity: Option<&str>) -> Result<(), DbError> {
    sqlx::query("INSERT INTO drained_workers (worker_name, identity) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(name)
        .bind(identity)
        .execute(pool)
        .await?;
    Ok(())
}

/// Lifts `name`'s quarantine and drain, in one transaction. Returns whether it was
/// `(quarantined, drained)`.
pub async fn release_worker(pool: &PgPool, name: &str) -> Result<(bool, bool), DbError> {
    let mut tx = pool.begin().await?;
    let quarantined = sqlx::query("DELETE FROM quarantined_workers WHERE worker_name = $1").bind(name).execute(&mut *tx).await?.rows_affected() > 0;
    let drained = sqlx::query("DELETE FROM drained_workers WHERE worker_name = $1").bind(name).execute(&mut *tx).await?.rows_affected() > 0;
    tx.commit().await?;
    Ok((quarantined, drained))
}

/// Strikes per worker name, for `names`.
pub async fn strikes(pool: &PgPool, names: &[String]) -> Result<Vec<(String, i64)>, DbError> {
    Ok(sqlx::query_as("SELECT worker_name, count(*) FROM strikes WHERE worker_name = ANY($1) GROUP BY worker_name")
        .bind(names)
        .fetch_all(pool)
        .await?)
}
