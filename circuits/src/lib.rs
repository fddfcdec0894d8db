//! Proofmesh's reference proof system, on plonky2 (the stable-Rust fork `qp-plonky2`):
//! Goldilocks field, FRI, Poseidon, the same family as zkSync's Boojum.
//!
//! A batch ([`batch::Batch`]) is proven through the aggregation rounds of DESIGN.md:
//! basic circuits ([`basic`]), leaf and node aggregation ([`aggregation`]), the recursion tip
//! ([`tip`]), the scheduler ([`scheduler`]) and compression ([`compression`]). Every circuit
//! verifies its inputs in-circuit against verifier data fixed in the circuit, and checks that they
//! fit together, so the final proof speaks for the whole batch; [`final_proof::verify`] checks it
//! from its bytes and the batch file alone.
//!
//! This crate does no networking and no database access; its only I/O is the setup-data cache
//! ([`setup`]) and the files the command line reads and writes.

pub mod aggregation;
pub mod basic;
pub mod batch;
pub mod compression;
pub mod final_proof;
mod gadgets;
pub mod job_input;
pub mod prover;
pub mod sample;
pub mod scheduler;
pub mod setup;
pub mod state;
pub mod tip;
pub mod witness_vector;

pub use plonky2;
pub use plonky2::field::types::Field;

/// The base field: Goldilocks, `p = 2^64 - 2^32 + 1`.
pub type F = plonky2::field::goldilocks_field::GoldilocksField;
/// The configuration of every circuit: Poseidon over Goldilocks, quadratic extension.
pub type C = plonky2::plonk::config::PoseidonGoldilocksConfig;
/// The extension degree.
pub const D: usize = 2;
