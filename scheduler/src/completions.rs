//! The completions batcher: every `Completed` report of every worker stream goes through one
//! task, which records those that arrive together in one transaction (one durable commit for
//! all of them) and answers each only after that commit. There is no waiting to fill a batch:
//! a report that finds the task idle is recorded at once, alone; reports that arrive while a
//! commit is under way form the next batch. So a lone completion costs its statements and one
//! commit, and a busy fleet's completions share commits (group commit, as River and
//! graphile-worker acknowledge jobs).
//!
//! Failure isolation: a lease that is not current ([`DbError::StaleLease`]) changes nothing, so
//! its refusal rides along with the batch. Any other error (a database error, a row the
//! scheduler cannot interpret) rolls the batch back, and then each report of it is recorded in
//! a transaction of its own: one poison report fails alone and never blocks the others.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::db::{self, Completion, DbError, Report};
use crate::state::Shared;

/// Reports recorded in one transaction at most.
pub const MAX_BATCH: usize = 256;

/// A report waiting for its commit.
#[derive(Debug)]
pub struct Pending {
    report: Report,
    reply: oneshot::Sender<Result<Completion, DbError>>,
}

/// Where the gRPC handlers send completions (held by [`Shared`]).
#[derive(Debug)]
pub struct Completions {
    tx: mpsc::Sender<Pending>,
    rx: std::sync::Mutex<Option<mpsc::Receiver<Pending>>>,
}

impl Default for Completions {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(16 * MAX_BATCH);
        Completions { tx, rx: std::sync::Mutex::new(Some(rx)) }
    }
}

impl Completions {
    /// Records `report` with the reports that arrive with it; returns after its commit.
    /// Errors: as [`db::complete`]; a scheduler shutting down (a database error, so the worker
    /// sends the report again to the next scheduler).
    pub async fn complete(&self, report: Report) -> Result<Completion, DbError> {
        let (reply, answer) = oneshot::channel();
        let gone = || DbError::Sql(sqlx::Error::PoolClosed);
        self.tx.send(Pending { report, reply }).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// The receiving end, for [`run`] (once).
    fn take(&self) -> Option<mpsc::Receiver<Pending>> {
        self.rx.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Runs the batcher until `cancel`. Panics if it runs twice on one [`Shared`].
pub async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut rx = shared.completions.take().expect("the completions batcher runs once per scheduler");
    loop {
        let first = tokio::select! {
            p = rx.recv() => match p { Some(p) => p, None => return },
            _ = cancel.cancelled() => return,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let reports: Vec<&Report> = batch.iter().map(|p| &p.report).collect();
        let results = match bounded(&shared, &reports).await {
            Ok(results) => results,
            // A connection that stopped answering: every report of the batch gets the error, and
            // its worker sends it again (recording is idempotent, so a commit that did land
            // before the deadline is answered `already recorded` then).
            Err(e) => (0..batch.len()).map(|_| Err(copy(&e))).collect(),
        };
        for (p, result) in batch.into_iter().zip(results) {
            let _ = p.reply.send(result);
        }
    }
}

/// The error of a batch that could not be recorded, for each of its reports (transient: its
/// worker sends the report again).
fn copy(e: &DbError) -> DbError {
    DbError::Sql(sqlx::Error::Io(std::io::Error::other(e.to_string())))
}

/// Records `reports` on one connection within the pass deadline (`Settings::db_pass_deadline`;
/// past it the connection is closed, as it may be half-open): together, or, if that fails,
/// each alone. `Err`: no connection, or the deadline passed.
async fn bounded(shared: &Shared, reports: &[&Report]) -> Result<Vec<Result<Completion, DbError>>, DbError> {
    let deadline = shared.settings.db_pass_deadline;
    let mut conn = db::pass_connection(&shared.pool, deadline).await?;
    match tokio::time::timeout(deadline, record(shared, &mut conn, reports)).await {
        Ok(results) => Ok(results),
        Err(_) => Err(db::abandon(conn, deadline)),
    }
}

/// Records `reports` together, or, if that fails, each in a transaction of its own.
async fn record(shared: &Shared, conn: &mut sqlx::PgConnection, reports: &[&Report]) -> Vec<Result<Completion, DbError>> {
    match together(shared, conn, reports).await {
        Ok(results) => results,
        Err(e) => {
            if reports.len() > 1 {
                tracing::warn!(reports = reports.len(), "recording completions together failed ({e}): one by one");
            }
            let mut results = Vec::with_capacity(reports.len());
            for report in reports {
                results.push(db::complete(&mut *conn, report, &shared.settings).await);
            }
            results
        }
    }
}

/// Records `reports` in one transaction ([`db::complete_many`]: one claim statement for all of
/// them). `Err`: nothing was recorded.
async fn together(shared: &Shared, conn: &mut sqlx::PgConnection, reports: &[&Report]) -> Result<Vec<Result<Completion, DbError>>, DbError> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    let results = db::complete_many(&mut tx, reports, &shared.settings).await?;
    tx.commit().await?;
    Ok(results)
}
