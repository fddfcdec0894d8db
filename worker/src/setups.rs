//! Setup data for the leases a worker gets: one [`SetupStore`] per (protocol version, geometry),
//! a bound on how many circuits' prover data stay in memory, and the artifact store as the
//! cluster's [`SetupMirror`] ([`ArtifactMirror`]: setup data built once per cluster, fetched by
//! the workers that do not have it, cached in their setup directory).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use proofmesh_circuits::basic::BasicCircuit;
use proofmesh_circuits::setup::{Circuit, CircuitKey, SetupMirror, SetupStore};
use proofmesh_core::{keys, ArtifactError, ArtifactStore, CircuitId, Geometry, ProtocolVersion};
use proofmesh_proto::v1;

use crate::runner::JobError;

/// Circuits whose prover data a worker keeps loaded (tens to hundreds of MB each).
const KEEP_LOADED: usize = 4;

/// The setup stores of one worker.
pub struct Setups {
    root: PathBuf,
    mirror: Option<Arc<dyn SetupMirror>>,
    stores: Mutex<HashMap<(ProtocolVersion, Geometry), Arc<SetupStore>>>,
    loaded: Mutex<Vec<CircuitKey>>,
    /// Told the loaded circuits' `(aggregation_round, circuit_id)` pairs whenever they change.
    on_change: OnceLock<LoadedCallback>,
}

/// See [`Setups::on_loaded_changed`].
type LoadedCallback = Box<dyn Fn(Vec<v1::CircuitPair>) + Send + Sync>;

/// The `(aggregation_round, circuit_id)` pair of a circuit (compression: round 5, id 0), as the
/// scheduler's affinity rule names it.
pub fn circuit_pair(key: CircuitKey) -> v1::CircuitPair {
    v1::CircuitPair {
        aggregation_round: key.round().map_or(5, |r| r as u32),
        circuit_id: u32::from(key.circuit_id().0),
    }
}

/// The protocol version and geometry a lease (or witness vector header) names.
pub fn version_and_geometry(
    v: Option<&v1::ProtocolVersion>,
    g: Option<&v1::Geometry>,
) -> Result<(ProtocolVersion, Geometry), JobError> {
    let version = v.and_then(|v| v.to_core()).ok_or_else(|| JobError::fatal("lease without a protocol version"))?;
    let geometry = g
        .ok_or_else(|| JobError::fatal("lease without a geometry"))?
        .to_core()
        .map_err(|e| JobError::fatal(format!("lease geometry: {e}")))?;
    Ok((version, geometry))
}

/// The circuit a proving job of `(round, circuit_id, depth)` proves.
pub fn circuit_key(job: &v1::JobIdentity) -> Result<CircuitKey, JobError> {
    let basic = || {
        u8::try_from(job.circuit_id)
            .ok()
            .and_then(|id| BasicCircuit::from_id(CircuitId(id)))
            .ok_or_else(|| JobError::fatal(format!("no basic circuit type {}", job.circuit_id)))
    };
    Ok(match job.aggregation_round {
        0 => CircuitKey::Basic(basic()?),
        1 => CircuitKey::Leaf(basic()?),
        2 => CircuitKey::Node(basic()?, job.depth as u8),
        3 => CircuitKey::RecursionTip,
        4 => CircuitKey::Scheduler,
        5 => CircuitKey::Compression,
        r => return Err(JobError::fatal(format!("no aggregation round {r}"))),
    })
}

impl std::fmt::Debug for Setups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setups").field("root", &self.root).field("loaded", &self.loaded).finish_non_exhaustive()
    }
}

impl Setups {
    /// Stores under `root` (the setup cache directory).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Setups { root: root.into(), mirror: None, stores: Mutex::default(), loaded: Mutex::default(), on_change: OnceLock::new() }
    }

    /// Fetches setup data the cache lacks from `mirror`, and publishes what this worker builds.
    pub fn with_mirror(mut self, mirror: Arc<dyn SetupMirror>) -> Self {
        self.mirror = Some(mirror);
        self
    }

    /// Calls `f` with the loaded circuits' pairs (deduplicated) each time they change: the lease
    /// client reports them to the scheduler. Only the first callback set is kept.
    pub fn on_loaded_changed(&self, f: impl Fn(Vec<v1::CircuitPair>) + Send + Sync + 'static) {
        let _ = self.on_change.set(Box::new(f));
    }

    /// The store for `version` and `geometry`. Errors: a version these circuits do not implement.
    pub fn store(&self, version: ProtocolVersion, geometry: Geometry) -> Result<Arc<SetupStore>, JobError> {
        let mut stores = self.stores.lock().expect("poisoned");
        if let Some(s) = stores.get(&(version, geometry)) {
            return Ok(s.clone());
        }
        let mut s = SetupStore::new(&self.root, version, geometry).map_err(|e| JobError::fatal(format!("{e:#}")))?;
        if let Some(m) = &self.mirror {
            s = s.with_mirror(m.clone());
        }
        let s = Arc::new(s);
        stores.insert((version, geometry), s.clone());
        Ok(s)
    }

    /// The circuit `key` of `store` with its prover data; frees the others first when more than
    /// a few are loaded. Call from a blocking thread (it may read or build setup data).
    pub fn circuit(&self, store: &SetupStore, key: CircuitKey) -> Result<Arc<Circuit>, JobError> {
        let changed = {
            let mut loaded = self.loaded.lock().expect("poisoned");
            if loaded.contains(&key) {
                None
            } else {
                if loaded.len() >= KEEP_LOADED {
                    for s in self.stores.lock().expect("poisoned").values() {
                        s.release();
                    }
                    loaded.clear();
                }
                loaded.push(key);
                let mut pairs: Vec<v1::CircuitPair> = vec![];
                for p in loaded.iter().map(|k| circuit_pair(*k)) {
                    if !pairs.contains(&p) {
                        pairs.push(p);
                    }
                }
                Some(pairs)
            }
        };
        let circuit = store.circuit(key).map_err(|e| JobError::retry(format!("setup data of {}: {e:#}", key.name())));
        if let (Some(pairs), Some(f)) = (changed, self.on_change.get()) {
            f(pairs);
        }
        circuit
    }
}

/// The artifact store as a [`SetupMirror`]: setup file `F` is the artifact `setup/F`
/// ([`keys::setup_file`]), checksummed like every artifact. Runs the store's async calls on
/// `runtime` from the blocking thread the setup store is used on.
#[derive(Debug)]
pub struct ArtifactMirror {
    store: Arc<dyn ArtifactStore>,
    runtime: tokio::runtime::Handle,
}

impl ArtifactMirror {
    /// A mirror over `store`, driven by the current Tokio runtime. Panics outside a runtime.
    pub fn new(store: Arc<dyn ArtifactStore>) -> Self {
        ArtifactMirror { store, runtime: tokio::runtime::Handle::current() }
    }
}

impl SetupMirror for ArtifactMirror {
    fn fetch(&self, file: &str) -> Option<Vec<u8>> {
        let key = keys::setup_file(file);
        match self.runtime.block_on(self.store.get(&key)) {
            Ok(bytes) => {
                tracing::info!(file, bytes = bytes.len(), "setup data fetched from the artifact store");
                Some(bytes)
            }
            Err(ArtifactError::NotFound { .. }) => None,
            Err(e) => {
                tracing::warn!(file, "cannot fetch setup data from the artifact store, building it here: {e}");
                None
            }
        }
    }

    fn publish(&self, file: &str, bytes: &[u8]) {
        let key = keys::setup_file(file);
        match self.runtime.block_on(self.store.put(&key, bytes.to_vec())) {
            Ok(()) => tracing::info!(file, bytes = bytes.len(), "setup data published to the artifact store"),
            Err(e) => tracing::warn!(file, "cannot publish setup data to the artifact store: {e}"),
        }
    }
}
