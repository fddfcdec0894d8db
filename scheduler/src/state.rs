//! What every part of the scheduler shares: the database pool, the settings, the connected
//! workers, and the two wake-up signals (work may be leasable; a batch changed).

use std::sync::{Arc, Mutex};

use proofmesh_core::{ArtifactStore, Geometry};
use sqlx::PgPool;
use tokio::sync::{broadcast, Notify};

use crate::registry::{Registry, ZonePolicy};

/// The scheduler's settings (from its command line).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The geometry new batches are proven with.
    pub geometry: Geometry,
    /// A lease's lifetime without a heartbeat, seconds.
    pub lease_secs: f64,
    /// Attempts per job before it (and its batch) fails.
    pub max_attempts: i32,
    /// Whether a WVG may stream to a prover of another zone.
    pub zone_policy: ZonePolicy,
    /// How often workers must heartbeat, milliseconds.
    pub heartbeat_ms: u32,
}

/// Shared by the gRPC services and the dispatcher.
#[derive(Debug)]
pub struct Shared {
    /// The job state.
    pub pool: PgPool,
    /// Settings.
    pub settings: Settings,
    /// Connected workers.
    pub registry: Mutex<Registry>,
    /// Woken whenever work may have become leasable: a job queued, a credit granted, a prover
    /// slot freed, a worker connected. The dispatcher never polls.
    pub wake: Notify,
    /// Batch numbers whose state or progress changed (for `WatchBatch`).
    pub batch_events: broadcast::Sender<i64>,
    /// Where final proofs are read for `GetProof`.
    pub artifacts: Arc<dyn ArtifactStore>,
}

impl Shared {
    /// New shared state.
    pub fn new(pool: PgPool, settings: Settings, artifacts: Arc<dyn ArtifactStore>) -> Arc<Self> {
        Arc::new(Shared {
            pool,
            settings,
            registry: Mutex::default(),
            wake: Notify::new(),
            batch_events: broadcast::channel(1024).0,
            artifacts,
        })
    }

    /// The registry (a poisoned lock means a panic while holding it: a bug; we go on with it).
    pub fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the dispatcher to look for leasable work.
    pub fn wake_dispatcher(&self) {
        self.wake.notify_one();
    }

    /// Tells `WatchBatch` streams that `batch` changed.
    pub fn batch_changed(&self, batch: i64) {
        let _ = self.batch_events.send(batch);
    }
}
