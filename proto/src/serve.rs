//! The services every Proofmesh gRPC server carries besides its own: server reflection (v1 and
//! v1alpha, so old and new grpcurl both work) and `grpc.health.v1`.

use tonic::transport::server::Router;

/// The encoded `FileDescriptorSet` of `proofmesh.v1` (and its imports), for reflection.
pub const DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("proofmesh_descriptor");

pub use tonic_health::server::HealthReporter;
pub use tonic_health::ServingStatus;

/// Adds reflection (v1, v1alpha) and health to `router`. Health answers `SERVING` for the server
/// as a whole (service `""`) until the returned reporter says otherwise; a server that is not
/// ready at once (the scheduler, until PostgreSQL answers) sets its statuses through it.
///
/// Errors only if the built-in descriptor sets fail to decode (a build problem).
pub fn reflection_and_health(router: Router) -> Result<(Router, HealthReporter), tonic_reflection::server::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let router = router.add_service(health).add_service(builder().build_v1()?).add_service(builder().build_v1alpha()?);
    Ok((router, reporter))
}
