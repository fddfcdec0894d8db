//! Proofmesh's domain types, shared by every crate of the workspace.
//!
//! The vocabulary follows zkSync Era's FRI prover (`prover/` in matter-labs/zksync-era):
//! a **batch** is proven through **aggregation rounds** 0..=4, each job of a round is named by
//! `(aggregation_round, circuit_id)`, and every job carries the **protocol version** it is proven
//! under. The **geometry** ([`Geometry`]) fixes how a batch is cut into circuits and how proofs
//! are aggregated; circuits, setup data and the job plan all derive from it. The **artifact
//! store** ([`artifacts`]) holds what jobs hand each other; [`batch`] is the batch file format.

pub mod artifacts;
pub mod backoff;
pub mod batch;
mod geometry;
pub mod shutdown;
pub mod telemetry;
mod types;

pub use artifacts::{keys, ArtifactError, ArtifactStore, LocalStore};
pub use geometry::{AggregationPlan, Geometry, GeometryError};
pub use types::{AggregationRound, BatchNumber, CircuitId, ProtocolVersion, UnknownRound};
