//! Artifact stores chosen by URL: `file:///PATH` (or a plain path) is a local directory
//! ([`proofmesh_core::LocalStore`], the default), `s3://BUCKET/PREFIX?...` an S3-compatible
//! bucket ([`S3Store`]). Every process of a cluster is given the same URL (`--artifacts`).
//!
//! Modules: `location` (the URL and its options), `s3` (the S3 store), `test_server` (feature
//! `test-server`: a moto_server for tests).

mod location;
mod s3;
#[cfg(feature = "test-server")]
pub mod test_server;

use std::sync::Arc;

use proofmesh_core::{ArtifactError, ArtifactStore, LocalStore};

pub use aws_sdk_s3::config::Credentials;
pub use location::{ArtifactsUrl, S3Location, UrlError};
pub use s3::{S3Store, CHECKSUM_METADATA};

/// Opens the store `url` names, with credentials from the standard AWS chain for `s3://`.
/// A local directory is created on first write; a bucket is checked at once (see
/// [`S3Store::connect`]). Errors: the bucket cannot be reached or read.
pub async fn open(url: &ArtifactsUrl) -> Result<Arc<dyn ArtifactStore>, ArtifactError> {
    Ok(match url {
        ArtifactsUrl::Local(dir) => Arc::new(LocalStore::new(dir)),
        ArtifactsUrl::S3(location) => Arc::new(S3Store::connect(location.clone(), None).await?),
    })
}
