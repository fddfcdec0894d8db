//! Where the artifacts live, as one URL every process is given (`--artifacts`,
//! `PROOFMESH_ARTIFACTS`):
//!
//! - `file:///var/lib/proofmesh` or a plain path `/var/lib/proofmesh`: a local directory
//!   ([`proofmesh_core::LocalStore`]), the default;
//! - `s3://BUCKET/PREFIX?endpoint=URL&region=R&path_style=true`: an S3 bucket or any store that
//!   speaks the S3 protocol (MinIO, Ceph, GCS through `https://storage.googleapis.com` with HMAC
//!   keys). Every query parameter is optional; see [`S3Location`] for their meaning and defaults.
//!
//! Credentials never go in the URL: they come from the standard AWS chain (environment,
//! `AWS_SHARED_CREDENTIALS_FILE`, web identity, instance metadata).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// One MiB, in bytes.
const MIB: usize = 1 << 20;

/// Where the artifacts are: parsed from `file://...`, a plain path, or `s3://...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactsUrl {
    /// A local (or shared-volume) directory.
    Local(PathBuf),
    /// A bucket and prefix in an S3-compatible store.
    S3(S3Location),
}

/// A bucket and prefix, and how to reach and use it. Query parameters of the `s3://` URL:
///
/// | parameter | meaning | default |
/// |---|---|---|
/// | `endpoint` | the service URL (`http://127.0.0.1:9000`, `https://storage.googleapis.com`) | AWS, from the region |
/// | `region` | signing region (`auto` for GCS) | the AWS chain's, else `us-east-1` |
/// | `path_style` | `true`: `ENDPOINT/BUCKET/KEY` instead of `BUCKET.ENDPOINT/KEY` | `false`, `true` when `endpoint` is set |
/// | `part_size_mib` | multipart part size, MiB (S3's minimum is 5) | 8 |
/// | `multipart_threshold_mib` | objects larger than this are uploaded in parts, MiB | 16 |
/// | `max_attempts` | attempts per request, retrying throttling, 5xx and timeouts with backoff | 5 |
/// | `attempt_timeout_secs` | limit for one attempt of one request, seconds | 120 |
/// | `connect_timeout_secs` | limit for opening a connection, seconds | 5 |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    /// The bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// The service's URL; `None` for AWS itself.
    pub endpoint: Option<String>,
    /// The signing region; `None`: from the AWS chain, else `us-east-1`.
    pub region: Option<String>,
    /// Path-style addressing.
    pub path_style: bool,
    /// Multipart part size in bytes (at least 5 MiB).
    pub part_size: usize,
    /// Objects larger than this many bytes are uploaded in parts.
    pub multipart_threshold: usize,
    /// Attempts per request (1 = no retry).
    pub max_attempts: u32,
    /// Limit for one attempt of one request.
    pub attempt_timeout: Duration,
    /// Limit for opening a connection.
    pub connect_timeout: Duration,
}

/// Why an artifacts URL was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    /// A scheme other than `file` and `s3`.
    #[error("unsupported artifacts URL scheme `{0}`: use file:///PATH, a plain path, or s3://BUCKET/PREFIX")]
    Scheme(String),
    /// The URL does not parse.
    #[error("invalid artifacts URL `{url}`: {reason}")]
    Invalid {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl FromStr for ArtifactsUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, UrlError> {
        let invalid = |reason: &str| UrlError::Invalid { url: s.into(), reason: reason.into() };
        if s.is_empty() {
            return Err(invalid("empty"));
        }
        let Some((scheme, _)) = s.split_once("://") else {
            return Ok(ArtifactsUrl::Local(PathBuf::from(s)));
        };
        let url = url::Url::parse(s).map_err(|e| invalid(&e.to_string()))?;
        match scheme {
            "file" => {
                let path = url.to_file_path().map_err(|()| invalid("a file URL needs an absolute path: file:///PATH"))?;
                Ok(ArtifactsUrl::Local(path))
            }
            "s3" => Ok(ArtifactsUrl::S3(S3Location::from_url(&url).map_err(|r| invalid(&r))?)),
            other => Err(UrlError::Scheme(other.into())),
        }
    }
}

impl ArtifactsUrl {
    /// Whether the store is an object store every machine reaches (`s3://`), as opposed to a
    /// directory that may be local to one.
    pub fn is_object_store(&self) -> bool {
        matches!(self, ArtifactsUrl::S3(_))
    }
}

impl S3Location {
    fn from_url(url: &url::Url) -> Result<Self, String> {
        let bucket = url.host_str().filter(|b| !b.is_empty()).ok_or("no bucket: s3://BUCKET/PREFIX")?.to_string();
        let prefix = url.path().trim_matches('/').to_string();
        if !prefix.is_empty() {
            proofmesh_core::artifacts::check_key(&prefix).map_err(|_| format!("prefix `{prefix}` is not a plain key path"))?;
        }
        let mut loc = S3Location {
            bucket,
            prefix,
            endpoint: None,
            region: None,
            path_style: false,
            part_size: 8 * MIB,
            multipart_threshold: 16 * MIB,
            max_attempts: 5,
            attempt_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(5),
        };
        let mut path_style = None;
        for (name, value) in url.query_pairs() {
            let number = |what: &str| value.parse::<u64>().map_err(|_| format!("{what} must be a whole number, not `{value}`"));
            match name.as_ref() {
                "endpoint" => {
                    let e = url::Url::parse(&value).map_err(|e| format!("endpoint `{value}`: {e}"))?;
                    if !matches!(e.scheme(), "http" | "https") {
                        return Err(format!("endpoint `{value}` must be http:// or https://"));
                    }
                    loc.endpoint = Some(value.trim_end_matches('/').to_string());
                }
                "region" => loc.region = Some(value.to_string()),
                "path_style" => {
                    path_style = Some(value.parse::<bool>().map_err(|_| format!("path_style must be true or false, not `{value}`"))?)
                }
                "part_size_mib" => loc.part_size = number("part_size_mib")? as usize * MIB,
                "multipart_threshold_mib" => loc.multipart_threshold = number("multipart_threshold_mib")? as usize * MIB,
                "max_attempts" => loc.max_attempts = number("max_attempts")? as u32,
                "attempt_timeout_secs" => loc.attempt_timeout = Duration::from_secs(number("attempt_timeout_secs")?),
                "connect_timeout_secs" => loc.connect_timeout = Duration::from_secs(number("connect_timeout_secs")?),
                other => return Err(format!("unknown parameter `{other}`")),
            }
        }
        loc.path_style = path_style.unwrap_or(loc.endpoint.is_some());
        if loc.part_size < 5 * MIB {
            return Err("part_size_mib must be at least 5 (S3's smallest part)".into());
        }
        if loc.max_attempts == 0 || loc.attempt_timeout.is_zero() || loc.connect_timeout.is_zero() {
            return Err("max_attempts and the timeouts must be at least 1".into());
        }
        Ok(loc)
    }

    /// The object key of artifact `key`: `PREFIX/key`, or `key` with no prefix.
    pub fn object_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }
}

impl fmt::Display for ArtifactsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArtifactsUrl::Local(path) => write!(f, "file://{}", path.display()),
            ArtifactsUrl::S3(loc) => {
                write!(f, "s3://{}/{}", loc.bucket, loc.prefix)?;
                if let Some(e) = &loc.endpoint {
                    write!(f, " at {e}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_file_urls_are_local() {
        assert_eq!("/var/lib/pm".parse(), Ok(ArtifactsUrl::Local("/var/lib/pm".into())));
        assert_eq!("data".parse(), Ok(ArtifactsUrl::Local("data".into())));
        assert_eq!("file:///var/lib/pm".parse(), Ok(ArtifactsUrl::Local("/var/lib/pm".into())));
    }

    #[test]
    fn s3_urls_carry_bucket_prefix_and_options() {
        let ArtifactsUrl::S3(loc) = "s3://proofs/era/mainnet?endpoint=http://127.0.0.1:9000/&region=auto&part_size_mib=6"
            .parse()
            .unwrap()
        else {
            panic!("not s3")
        };
        assert_eq!((loc.bucket.as_str(), loc.prefix.as_str()), ("proofs", "era/mainnet"));
        assert_eq!(loc.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(loc.region.as_deref(), Some("auto"));
        assert!(loc.path_style, "a custom endpoint defaults to path style");
        assert_eq!(loc.part_size, 6 << 20);
        assert_eq!(loc.object_key("batches/000001/batch.bin"), "era/mainnet/batches/000001/batch.bin");
        let ArtifactsUrl::S3(aws) = "s3://proofs".parse().unwrap() else { panic!("not s3") };
        assert_eq!((aws.prefix.as_str(), aws.path_style, aws.endpoint.as_deref()), ("", false, None));
        assert_eq!(aws.object_key("a/b"), "a/b");
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, says) in [
            ("gs://bucket", "unsupported"),
            ("s3:///prefix", "no bucket"),
            ("s3://b/p?colour=red", "unknown parameter `colour`"),
            ("s3://b/p?part_size_mib=1", "at least 5"),
            ("s3://b/p?max_attempts=x", "whole number"),
            ("s3://b/p?endpoint=ftp://x", "http"),
            ("s3://b/a%20b", "plain key path"),
            ("", "empty"),
        ] {
            let e = url.parse::<ArtifactsUrl>().unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
        }
    }
}
