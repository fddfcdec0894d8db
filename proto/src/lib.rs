//! Proofmesh's gRPC API (`proto/proofmesh/v1/proofmesh.proto`): generated tonic/prost code, the
//! descriptor set for server reflection, and small conversions to the domain types of
//! `proofmesh-core`.

#![allow(clippy::large_enum_variant)]

/// Generated code of package `proofmesh.v1`.
pub mod v1 {
    tonic::include_proto!("proofmesh.v1");
}

mod convert;
pub mod limits;
mod serve;
pub mod tls;

pub use limits::GrpcLimits;
pub use tls::{peer_identity, PeerIdentity, SubjectPattern, TlsArgs};
pub use serve::{reflection_and_health, HealthReporter, ServingStatus, DESCRIPTOR_SET};
