//! Proofmesh workers. Every role is **lease -> execute -> save** ([`runner`]): the shared
//! [`lease`] client takes leases from the scheduler over one stream, a role's [`runner::Stage`]
//! reads inputs from the artifact store, runs an [`execute`] function on a blocking thread and
//! saves the result.
//!
//! Roles: `witness-generator` ([`wg`]), `wvg` ([`wvg`], streams witness vectors with [`stream`]),
//! `prover` ([`prover`], serves `Prover.PushWitnessVector`). The compressor (crate
//! `proofmesh-compressor`) is one more [`runner::Stage`] on the same client.

pub mod cpu;
pub mod execute;
pub mod lease;
pub mod prover;
pub mod runner;
pub mod setups;
pub mod stream;
pub mod wg;
pub mod wvg;
