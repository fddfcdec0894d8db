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
        let results = match together(&shared, &reports).await {
            Ok(results) => results,
            Err(e) => {
                if batch.len() > 1 {
                    tracing::warn!(reports = batch.len(), "recording completions together failed ({e}): one by one");
                }
                let mut results = Vec::with_capacity(batch.len());
                for report in &reports {
                    results.push(db::complete(&shared.pool, report, &shared.settings).await);
                }
                results
            }
        };
        for (p, result) in batch.into_iter().zip(results) {
            let _ = p.reply.send(result);
        }
    }
}

/// Records `reports` in one transaction ([`db::complete_many`]: one claim statement for all of
/// them). `Err`: nothing was recorded.
async fn together(shared: &Shared, reports: &[&Report]) -> Result<Vec<Result<Completion, DbError>>, DbError> {
    let mut tx = shared.pool.begin().await?;
    let results = db::complete_many(&mut tx, reports, &shared.settings).await?;
    tx.commit().await?;
    Ok(results)
}
