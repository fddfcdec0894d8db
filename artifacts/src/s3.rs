//! The S3 artifact store: one object per artifact under `s3://BUCKET/PREFIX/`, through
//! aws-sdk-s3 (rustls with ring).
//!
//! - **Integrity**: every object is stored with the SHA-256 of its bytes in its user metadata
//!   (`x-amz-meta-proofmesh-sha256`, hex); a read recomputes it and refuses a mismatch
//!   ([`ArtifactError::Corrupt`]), so a corrupted or truncated object is a clear error, never
//!   a bad input to a proof. An object with no checksum (written by something else) is refused
//!   the same way.
//! - **Atomic writes**: a `PutObject`, or above `multipart_threshold` a multipart upload
//!   (`CreateMultipartUpload`, `UploadPart` x N, `CompleteMultipartUpload`; aborted on error):
//!   S3 makes the object visible only when the upload completes, so a reader sees the old
//!   object, the new one, or none ([`ArtifactStore`]'s contract).
//! - **Retries and timeouts**: the SDK's standard retry mode (throttling, 5xx, timeouts,
//!   exponential backoff with jitter, `max_attempts`), a limit per attempt and per connection.
//! - **Compatibility**: request checksums only where the API requires them (the SDK's newer
//!   default headers are refused by some S3-compatible stores, GCS among them).

use std::collections::HashMap;

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{Credentials, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
use proofmesh_core::artifacts::check_key;
use proofmesh_core::{ArtifactError, ArtifactStore};
use sha2::{Digest, Sha256};

use crate::location::S3Location;

/// The user-metadata name the checksum is stored under (`x-amz-meta-proofmesh-sha256`).
pub const CHECKSUM_METADATA: &str = "proofmesh-sha256";

/// An [`ArtifactStore`] in an S3-compatible bucket (see the module docs).
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    location: S3Location,
}

impl S3Store {
    /// Connects to `location` and checks that its bucket can be reached (`HeadBucket`), so that
    /// a wrong endpoint, bucket or credentials stop a process at start, not its first job.
    /// `credentials`: `None` takes them from the standard AWS chain (environment,
    /// `AWS_SHARED_CREDENTIALS_FILE`, web identity, instance metadata).
    /// Errors: [`ArtifactError::Io`] naming the bucket and the service's answer.
    pub async fn connect(location: S3Location, credentials: Option<Credentials>) -> Result<Self, ArtifactError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(https_client())
            .retry_config(RetryConfig::standard().with_max_attempts(location.max_attempts))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(location.connect_timeout)
                    .operation_attempt_timeout(location.attempt_timeout)
                    .build(),
            );
        if let Some(region) = &location.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(credentials) = credentials {
            loader = loader.credentials_provider(credentials);
        }
        let shared = loader.load().await;
        let mut config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(location.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if shared.region().is_none() {
            config = config.region(Region::new("us-east-1"));
        }
        if let Some(endpoint) = &location.endpoint {
            config = config.endpoint_url(endpoint);
        }
        let store = S3Store { client: Client::from_conf(config.build()), location };
        store
            .client
            .head_bucket()
            .bucket(&store.location.bucket)
            .send()
            .await
            .map_err(|e| backend(&format!("s3://{}", store.location.bucket), e))?;
        Ok(store)
    }

    /// Where this store writes.
    pub fn location(&self) -> &S3Location {
        &self.location
    }

    async fn put_multipart(&self, object: &str, bytes: &[u8], metadata: HashMap<String, String>) -> Result<(), String> {
        let bucket = &self.location.bucket;
        let created = self
            .client
            .create_multipart_upload()
            .bucket(bucket)
            .key(object)
            .set_metadata(Some(metadata))
            .send()
            .await
            .map_err(describe)?;
        let upload_id = created.upload_id().ok_or("the service gave no upload id")?.to_string();
        let uploaded = self.upload_parts(object, &upload_id, bytes).await;
        let result = match uploaded {
            Ok(parts) => self
                .client
                .complete_multipart_upload()
                .bucket(bucket)
                .key(object)
                .upload_id(&upload_id)
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                .send()
                .await
                .map(|_| ())
                .map_err(describe),
            Err(e) => Err(e),
        };
        if result.is_err() {
            // Best effort: the parts uploaded so far would otherwise be kept (and billed) until a
            // bucket lifecycle rule removes them. Nothing is visible under the key either way.
            if let Err(e) = self.client.abort_multipart_upload().bucket(bucket).key(object).upload_id(&upload_id).send().await
            {
                tracing::warn!(object, "could not abort the failed multipart upload: {}", describe(e));
            }
        }
        result
    }

    /// Uploads `bytes` in parts of `part_size`, one after another (each part is retried by the
    /// SDK); returns the parts for `CompleteMultipartUpload`.
    async fn upload_parts(&self, object: &str, upload_id: &str, bytes: &[u8]) -> Result<Vec<CompletedPart>, String> {
        let mut parts = Vec::new();
        for (i, chunk) in bytes.chunks(self.location.part_size).enumerate() {
            let number = i as i32 + 1;
            let out = self
                .client
                .upload_part()
                .bucket(&self.location.bucket)
                .key(object)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(chunk.to_vec()))
                .send()
                .await
                .map_err(|e| format!("part {number}: {}", describe(e)))?;
            parts.push(CompletedPart::builder().set_e_tag(out.e_tag).part_number(number).build());
        }
        Ok(parts)
    }
}

#[async_trait]
impl ArtifactStore for S3Store {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), ArtifactError> {
        check_key(key)?;
        let object = self.location.object_key(key);
        let metadata = HashMap::from([(CHECKSUM_METADATA.to_string(), sha256_hex(&bytes))]);
        let result = if bytes.len() > self.location.multipart_threshold {
            self.put_multipart(&object, &bytes, metadata).await
        } else {
            self.client
                .put_object()
                .bucket(&self.location.bucket)
                .key(&object)
                .set_metadata(Some(metadata))
                .body(ByteStream::from(bytes))
                .send()
                .await
                .map(|_| ())
                .map_err(describe)
        };
        result.map_err(|message| ArtifactError::Io { key: key.into(), source: std::io::Error::other(message) })
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, ArtifactError> {
        check_key(key)?;
        let object = self.location.object_key(key);
        let out = match self.client.get_object().bucket(&self.location.bucket).key(&object).send().await {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) || status(&e) == Some(404) => {
                return Err(ArtifactError::NotFound { key: key.into() });
            }
            Err(e) => return Err(backend(key, e)),
        };
        let expected = out.metadata().and_then(|m| m.get(CHECKSUM_METADATA)).cloned();
        let bytes = out.body.collect().await.map_err(|e| backend(key, e))?.to_vec();
        let actual = sha256_hex(&bytes);
        match expected {
            Some(expected) if expected == actual => Ok(bytes),
            expected => Err(ArtifactError::Corrupt {
                key: key.into(),
                expected: expected.unwrap_or_else(|| "(none stored)".into()),
                actual,
                len: bytes.len(),
            }),
        }
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, ArtifactError> {
        check_key(prefix)?;
        let listed = format!("{}/", self.location.object_key(prefix));
        let mut deleted = 0u64;
        let mut token = None;
        loop {
            // Pages of at most 1,000 keys, which is also DeleteObjects' limit.
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.location.bucket)
                .prefix(&listed)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| backend(prefix, e))?;
            let objects = page
                .contents()
                .iter()
                .filter_map(|o| o.key())
                .map(|k| ObjectIdentifier::builder().key(k).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| backend(prefix, e))?;
            if !objects.is_empty() {
                let count = objects.len() as u64;
                let delete = Delete::builder().set_objects(Some(objects)).quiet(true).build().map_err(|e| backend(prefix, e))?;
                let out = self
                    .client
                    .delete_objects()
                    .bucket(&self.location.bucket)
                    .delete(delete)
                    .send()
                    .await
                    .map_err(|e| backend(prefix, e))?;
                if let Some(first) = out.errors().first() {
                    return Err(ArtifactError::Io {
                        key: prefix.into(),
                        source: std::io::Error::other(format!(
                            "{} objects not deleted, first `{}`: {}",
                            out.errors().len(),
                            first.key().unwrap_or("?"),
                            first.message().unwrap_or("no reason given")
                        )),
                    });
                }
                deleted += count;
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_string()),
                _ => return Ok(deleted),
            }
        }
    }
}

/// The SDK's hyper client over rustls with ring (never aws-lc: shared TOOLING.md).
pub(crate) fn https_client() -> aws_sdk_s3::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https()
}

/// SHA-256 of `bytes`, lower-case hex.
fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The HTTP status of a failed request, if it got an answer.
fn status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

/// The error with its whole chain of causes and the service's code and message.
fn describe<E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static, R: std::fmt::Debug>(
    e: SdkError<E, R>,
) -> String {
    let code = e.code().map(|c| format!(" ({c})")).unwrap_or_default();
    format!("{}{code}", DisplayErrorContext(e))
}

fn backend(key: &str, e: impl std::error::Error + Send + Sync + 'static) -> ArtifactError {
    ArtifactError::Io { key: key.into(), source: std::io::Error::other(DisplayErrorContext(e).to_string()) }
}
