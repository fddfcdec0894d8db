//! Setup data: every circuit, keyed by [`CircuitKey`], built once, serialized, cached on disk and
//! loaded from there afterwards.
//!
//! The cache directory holds one folder per `(protocol version, geometry, circuit revision)`
//! ([`SetupStore::folder`]); in it, per circuit, `NAME.circuit` (the witness targets, then the
//! prover and verifier data: 10s to 100s of MB) and `NAME.verifier` (common and verifier-only data,
//! a few KB). Building a circuit that verifies another needs only the inner circuit's verifier
//! data, so the big files are read only to prove. Files are written to a temporary name and
//! renamed, so a crash never leaves a half-written setup behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use plonky2::plonk::circuit_builder::CircuitBuilder;
use plonky2::plonk::circuit_data::{CircuitConfig, CircuitData, VerifierCircuitData};
use plonky2::util::serialization::{Buffer, DefaultGateSerializer, DefaultGeneratorSerializer, Read, Write};
use proofmesh_core::{AggregationRound, CircuitId, Geometry, ProtocolVersion};

use crate::aggregation::AggregationTargets;
use crate::basic::{BasicCircuit, BasicTargets};
use crate::compression::CompressionTargets;
use crate::scheduler::SchedulerTargets;
use crate::tip::TipTargets;
use crate::{aggregation, basic, compression, scheduler, tip, C, D, F};

/// Bumped whenever a circuit's constraints change, so old caches are never loaded.
pub const CIRCUITS_REVISION: u32 = 1;

/// Names one circuit of the proof tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CircuitKey {
    /// Round 0, one per basic type.
    Basic(BasicCircuit),
    /// Round 1, aggregating basic proofs of a type.
    Leaf(BasicCircuit),
    /// Round 2 at a depth: depth 0 aggregates leaf proofs, depth `d > 0` node proofs of depth `d - 1`.
    Node(BasicCircuit, u8),
    /// Round 3.
    RecursionTip,
    /// Round 4.
    Scheduler,
    /// The compression stage after round 4.
    Compression,
}

impl CircuitKey {
    /// The aggregation round, or `None` for compression.
    pub fn round(self) -> Option<AggregationRound> {
        Some(match self {
            Self::Basic(_) => AggregationRound::BasicCircuits,
            Self::Leaf(_) => AggregationRound::LeafAggregation,
            Self::Node(..) => AggregationRound::NodeAggregation,
            Self::RecursionTip => AggregationRound::RecursionTip,
            Self::Scheduler => AggregationRound::Scheduler,
            Self::Compression => return None,
        })
    }

    /// The circuit id (the basic type for rounds 0..=2, 0 otherwise).
    pub fn circuit_id(self) -> CircuitId {
        match self {
            Self::Basic(t) | Self::Leaf(t) | Self::Node(t, _) => t.id(),
            _ => CircuitId(0),
        }
    }

    /// A file-name-safe name: `basic-1`, `leaf-2`, `node-3-d1`, `recursion_tip`, `scheduler`, `compression`.
    pub fn name(self) -> String {
        match self {
            Self::Basic(t) => format!("basic-{}", t.id()),
            Self::Leaf(t) => format!("leaf-{}", t.id()),
            Self::Node(t, d) => format!("node-{}-d{d}", t.id()),
            Self::RecursionTip => "recursion_tip".into(),
            Self::Scheduler => "scheduler".into(),
            Self::Compression => "compression".into(),
        }
    }

    /// Three bytes: stage (round 0..=4, 5 for compression), circuit id, depth.
    pub fn to_bytes(self) -> [u8; 3] {
        let stage = self.round().map_or(5, |r| r as u8);
        let depth = if let Self::Node(_, d) = self { d } else { 0 };
        [stage, self.circuit_id().0, depth]
    }

    /// The inverse of [`CircuitKey::to_bytes`]; `None` for bytes that name no circuit.
    pub fn from_bytes(b: [u8; 3]) -> Option<Self> {
        let basic = BasicCircuit::from_id(CircuitId(b[1]));
        Some(match b[0] {
            0 => Self::Basic(basic?),
            1 => Self::Leaf(basic?),
            2 => Self::Node(basic?, b[2]),
            3 => Self::RecursionTip,
            4 => Self::Scheduler,
            5 => Self::Compression,
            _ => return None,
        })
    }
}

/// The witness targets of a circuit, by kind.
#[derive(Debug, Clone)]
pub enum Targets {
    /// Round 0.
    Basic(BasicTargets),
    /// Rounds 1 and 2.
    Aggregation(AggregationTargets),
    /// Round 3.
    Tip(TipTargets),
    /// Round 4.
    Scheduler(SchedulerTargets),
    /// Compression.
    Compression(CompressionTargets),
}

impl Targets {
    fn write(&self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let r = match self {
            Self::Basic(t) => buf.write_u8(0).and_then(|_| t.write(buf)),
            Self::Aggregation(t) => buf.write_u8(1).and_then(|_| t.write(buf)),
            Self::Tip(t) => buf.write_u8(2).and_then(|_| t.write(buf)),
            Self::Scheduler(t) => buf.write_u8(3).and_then(|_| t.write(buf)),
            Self::Compression(t) => buf.write_u8(4).and_then(|_| t.write(buf)),
        };
        r.map_err(|_| std::io::Error::other("serializing circuit targets"))
    }

    fn read(buf: &mut Buffer) -> anyhow::Result<Self> {
        let r = match buf.read_u8() {
            Ok(0) => BasicTargets::read(buf).map(Self::Basic),
            Ok(1) => AggregationTargets::read(buf).map(Self::Aggregation),
            Ok(2) => TipTargets::read(buf).map(Self::Tip),
            Ok(3) => SchedulerTargets::read(buf).map(Self::Scheduler),
            Ok(4) => CompressionTargets::read(buf).map(Self::Compression),
            _ => anyhow::bail!("unknown circuit target kind"),
        };
        r.map_err(|_| anyhow::anyhow!("malformed circuit targets"))
    }
}

/// A circuit ready to prove: its setup data and where its witness goes.
pub struct Circuit {
    /// Which circuit.
    pub key: CircuitKey,
    /// Prover, verifier and common data.
    pub data: CircuitData<F, C, D>,
    /// Witness targets.
    pub targets: Targets,
}

impl Circuit {
    /// log2 of the circuit's row count.
    pub fn degree_bits(&self) -> usize {
        self.data.common.degree_bits()
    }
}

/// How a circuit's setup data was obtained, and how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupSource {
    /// Built from scratch (and written to the cache).
    Built(Duration),
    /// Read from the disk cache.
    Loaded(Duration),
    /// Fetched from the [`SetupMirror`] into the disk cache, then read.
    Fetched(Duration),
}

/// A copy of the setup files that every worker can reach (the cluster's artifact store), so
/// that setup data is built once per cluster, not once per machine: consulted before building,
/// and given what is built. Files are named relative to the cache root
/// (`v0.1-<geometry>-r<revision>/<circuit>.circuit` or `.verifier`).
///
/// Called from blocking threads. A mirror that fails logs why and answers `None` (the circuit
/// is then built locally): it never makes setup data unavailable.
pub trait SetupMirror: Send + Sync {
    /// The bytes of `file`, or `None` if the mirror does not have it (or cannot be read).
    fn fetch(&self, file: &str) -> Option<Vec<u8>>;
    /// Stores `file` in the mirror (best effort).
    fn publish(&self, file: &str, bytes: &[u8]);
}

/// Setup data for one protocol version and geometry, cached on disk under `root`.
pub struct SetupStore {
    folder: PathBuf,
    geometry: Geometry,
    verifiers: Mutex<HashMap<CircuitKey, Arc<VerifierCircuitData<F, C, D>>>>,
    circuits: Mutex<HashMap<CircuitKey, Arc<Circuit>>>,
    sources: Mutex<HashMap<CircuitKey, SetupSource>>,
    mirror: Option<Arc<dyn SetupMirror>>,
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = proofmesh_core::artifacts::temporary_path(path);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

impl SetupStore {
    /// A store for `version` and `geometry` (validated) whose cache lives under `root`.
    pub fn new(root: &Path, version: ProtocolVersion, geometry: Geometry) -> anyhow::Result<Self> {
        geometry.validate()?;
        anyhow::ensure!(
            version.minor == ProtocolVersion::CURRENT.minor,
            "protocol version {version} is not proven by these circuits (they implement 0.{}.x)",
            ProtocolVersion::CURRENT.minor
        );
        let folder = root.join(format!("v0.{}-{}-r{CIRCUITS_REVISION}", version.minor, geometry.cache_key()));
        std::fs::create_dir_all(&folder).with_context(|| format!("creating setup cache {}", folder.display()))?;
        Ok(SetupStore {
            folder,
            geometry,
            verifiers: Mutex::default(),
            circuits: Mutex::default(),
            sources: Mutex::default(),
            mirror: None,
        })
    }

    /// Fetches missing setup files from `mirror` before building them, and publishes what it
    /// builds there.
    pub fn with_mirror(mut self, mirror: Arc<dyn SetupMirror>) -> Self {
        self.mirror = Some(mirror);
        self
    }

    /// `file` of this store as the mirror names it: `<folder name>/<file>`.
    fn mirror_name(&self, file: &str) -> String {
        format!("{}/{file}", self.folder.file_name().and_then(|n| n.to_str()).unwrap_or_default())
    }

    /// Fetches `files` (all or none) from the mirror into the folder; whether it did.
    fn fetch(&self, files: &[String]) -> anyhow::Result<bool> {
        let Some(mirror) = &self.mirror else { return Ok(false) };
        let mut fetched = Vec::new();
        for file in files {
            match mirror.fetch(&self.mirror_name(file)) {
                Some(bytes) => fetched.push((file, bytes)),
                None => return Ok(false),
            }
        }
        for (file, bytes) in fetched {
            write_atomic(&self.folder.join(file), &bytes)?;
        }
        Ok(true)
    }

    /// The geometry the circuits are built for.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The folder holding this version's and geometry's setup files.
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    /// How each circuit's setup was obtained in this process so far.
    pub fn sources(&self) -> HashMap<CircuitKey, SetupSource> {
        self.sources.lock().expect("poisoned").clone()
    }

    /// The circuit `key`, from memory, else the disk cache, else built (with whatever it
    /// depends on) and cached; kept in memory until [`SetupStore::release`].
    pub fn circuit(&self, key: CircuitKey) -> anyhow::Result<Arc<Circuit>> {
        if let Some(c) = self.circuits.lock().expect("poisoned").get(&key) {
            return Ok(c.clone());
        }
        let circuit = Arc::new(self.obtain(key)?);
        self.circuits.lock().expect("poisoned").insert(key, circuit.clone());
        Ok(circuit)
    }

    /// Loads `key` from the disk cache, or builds and caches it.
    fn obtain(&self, key: CircuitKey) -> anyhow::Result<Circuit> {
        let path = self.folder.join(format!("{}.circuit", key.name()));
        let start = Instant::now();
        let (circuit, source) = if path.exists() {
            (self.load(key, &path)?, SetupSource::Loaded as fn(Duration) -> SetupSource)
        } else if self.fetch(&[format!("{}.circuit", key.name()), format!("{}.verifier", key.name())])? {
            (self.load(key, &path)?, SetupSource::Fetched as fn(Duration) -> SetupSource)
        } else {
            (self.build(key)?, SetupSource::Built as fn(Duration) -> SetupSource)
        };
        self.sources.lock().expect("poisoned").insert(key, source(start.elapsed()));
        Ok(circuit)
    }

    /// The verifier data (common + verifier-only) of `key`: small, kept in memory.
    pub fn verifier(&self, key: CircuitKey) -> anyhow::Result<Arc<VerifierCircuitData<F, C, D>>> {
        if let Some(v) = self.verifiers.lock().expect("poisoned").get(&key) {
            return Ok(v.clone());
        }
        let path = self.folder.join(format!("{}.verifier", key.name()));
        if !path.exists() && !self.fetch(&[format!("{}.verifier", key.name())])? {
            // Building writes the verifier file; the prover data is not kept in memory here.
            self.obtain(key)?;
        }
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let v = VerifierCircuitData::from_bytes(bytes, &DefaultGateSerializer)
            .map_err(|_| anyhow::anyhow!("corrupt verifier data {}", path.display()))?;
        let v = Arc::new(v);
        self.verifiers.lock().expect("poisoned").insert(key, v.clone());
        Ok(v)
    }

    /// Checks `proof` (a proof of circuit `key`, `ProofWithPublicInputs::to_bytes`) natively
    /// against `key`'s verifier data, as the next round does before building on it (milliseconds).
    /// Errors: verifier data that cannot be obtained (`Ok(Err(_))` is the proof's fault: bytes
    /// that do not parse as a proof of that circuit, or a proof that does not verify).
    pub fn check_proof(&self, key: CircuitKey, proof: &[u8]) -> anyhow::Result<Result<(), String>> {
        let v = self.verifier(key)?;
        let proof = match plonky2::plonk::proof::ProofWithPublicInputs::<F, C, D>::from_bytes(proof.to_vec(), &v.common) {
            Ok(p) => p,
            Err(e) => return Ok(Err(format!("not a proof of {}: {e}", key.name()))),
        };
        // A malformed proof must not take the process down with it.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| v.verify(proof))) {
            Ok(r) => Ok(r.map_err(|e| format!("a proof of {} that does not verify: {e}", key.name()))),
            Err(_) => Ok(Err(format!("a proof of {} that does not verify (the verifier panicked on it)", key.name()))),
        }
    }

    /// The verification key hash of the final (compression) circuit, as the scheduler's protocol
    /// version table records it: its plonky2 `circuit_digest` (4 Goldilocks elements, each 8
    /// bytes little-endian), 64 lowercase hex digits. Builds the setup chain if it is not cached.
    pub fn vk_hash(&self) -> anyhow::Result<String> {
        use plonky2::field::types::PrimeField64;
        let v = self.verifier(CircuitKey::Compression)?;
        Ok(v.verifier_only
            .circuit_digest
            .elements
            .iter()
            .flat_map(|e| e.to_canonical_u64().to_le_bytes())
            .map(|b| format!("{b:02x}"))
            .collect())
    }

    /// Drops the circuits held in memory (their verifier data stays). Call between rounds to
    /// bound memory: a circuit's prover data is 10s to 100s of MB.
    pub fn release(&self) {
        self.circuits.lock().expect("poisoned").clear();
    }

    fn load(&self, key: CircuitKey, path: &Path) -> anyhow::Result<Circuit> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let corrupt = || anyhow::anyhow!("corrupt setup data {} (delete it to rebuild)", path.display());
        let mut buf = Buffer::new(&bytes);
        let targets = Targets::read(&mut buf).map_err(|_| corrupt())?;
        let data = CircuitData::from_bytes(
            &bytes[buf.pos()..],
            &DefaultGateSerializer,
            &DefaultGeneratorSerializer::<C, D>::default(),
        )
        .map_err(|_| corrupt())?;
        Ok(Circuit { key, data, targets })
    }

    fn build(&self, key: CircuitKey) -> anyhow::Result<Circuit> {
        let g = self.geometry;
        let config = CircuitConfig::standard_recursion_config();
        let (builder, targets): (CircuitBuilder<F, D>, Targets) = match key {
            CircuitKey::Basic(t) => {
                let (b, t) = basic::build(t, &g, config);
                (b, Targets::Basic(t))
            }
            CircuitKey::Leaf(t) => {
                let inner = self.verifier(CircuitKey::Basic(t))?;
                let (b, t) = aggregation::build(&inner, g.leaf_fan_in.into(), config);
                (b, Targets::Aggregation(t))
            }
            CircuitKey::Node(t, d) => {
                anyhow::ensure!(d < g.max_node_depth, "node depth {d} beyond the geometry's {}", g.max_node_depth);
                let inner = self.verifier(if d == 0 { CircuitKey::Leaf(t) } else { CircuitKey::Node(t, d - 1) })?;
                let (b, t) = aggregation::build(&inner, g.node_fan_in.into(), config);
                (b, Targets::Aggregation(t))
            }
            CircuitKey::RecursionTip => {
                let nodes = BasicCircuit::ALL
                    .iter()
                    .map(|t| {
                        (0..g.max_node_depth)
                            .map(|d| self.verifier(CircuitKey::Node(*t, d)).map(|v| (*v).clone()))
                            .collect::<anyhow::Result<Vec<_>>>()
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let (b, t) = tip::build(&nodes, config)?;
                (b, Targets::Tip(t))
            }
            CircuitKey::Scheduler => {
                let inner = self.verifier(CircuitKey::RecursionTip)?;
                let (b, t) = scheduler::build(&inner, config);
                (b, Targets::Scheduler(t))
            }
            CircuitKey::Compression => {
                let inner = self.verifier(CircuitKey::Scheduler)?;
                let (b, t) = compression::build(&inner);
                (b, Targets::Compression(t))
            }
        };
        let data = builder.build::<C>();
        let mut bytes = Vec::new();
        targets.write(&mut bytes)?;
        let circuit = data
            .to_bytes(&DefaultGateSerializer, &DefaultGeneratorSerializer::<C, D>::default())
            .map_err(|_| anyhow::anyhow!("serializing setup data of {}", key.name()))?;
        bytes.extend_from_slice(&circuit);
        let verifier = data
            .verifier_data()
            .to_bytes(&DefaultGateSerializer)
            .map_err(|_| anyhow::anyhow!("serializing verifier data of {}", key.name()))?;
        // The verifier file is written (and published) last: a reader that finds the circuit
        // file also finds the verifier file.
        for (file, bytes) in [(format!("{}.circuit", key.name()), &bytes), (format!("{}.verifier", key.name()), &verifier)] {
            write_atomic(&self.folder.join(&file), bytes)?;
            if let Some(mirror) = &self.mirror {
                mirror.publish(&self.mirror_name(&file), bytes);
            }
        }
        Ok(Circuit { key, data, targets })
    }
}
