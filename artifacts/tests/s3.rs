//! The S3 store against a real S3-protocol server over TCP (moto_server, see
//! `proofmesh_artifacts::test_server`), one server per test on its own port.

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use proofmesh_artifacts::test_server::MotoServer;
use proofmesh_artifacts::{ArtifactsUrl, S3Location, S3Store, CHECKSUM_METADATA};
use proofmesh_core::{ArtifactError, ArtifactStore};
use rand::RngCore;

const BUCKET: &str = "proofmesh-test";

fn location(moto: &MotoServer, prefix: &str, options: &str) -> S3Location {
    match moto.url(BUCKET, prefix, options).parse().unwrap() {
        ArtifactsUrl::S3(loc) => loc,
        other => panic!("not an s3 location: {other:?}"),
    }
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

async fn store(moto: &MotoServer, prefix: &str, options: &str) -> S3Store {
    S3Store::connect(location(moto, prefix, options), Some(MotoServer::credentials())).await.unwrap()
}

#[tokio::test]
async fn round_trip_overwrite_missing_and_delete_by_prefix() {
    let moto = MotoServer::start();
    // The bucket is checked at connect: a missing one stops a process at start, named.
    let e = S3Store::connect(location(&moto, "p", ""), Some(MotoServer::credentials())).await.unwrap_err().to_string();
    assert!(e.contains(BUCKET), "{e}");
    moto.make_bucket(BUCKET).await;
    let s = store(&moto, "cluster/a", "").await;

    let key = "batches/000001/batch.bin";
    assert!(matches!(s.get(key).await, Err(ArtifactError::NotFound { .. })));
    s.put(key, b"one".to_vec()).await.unwrap();
    s.put(key, b"two".to_vec()).await.unwrap();
    assert_eq!(s.get(key).await.unwrap(), b"two");
    // Under the prefix, with its checksum.
    let head = moto.raw_client().head_object().bucket(BUCKET).key(format!("cluster/a/{key}")).send().await.unwrap();
    assert_eq!(head.metadata().unwrap()[CHECKSUM_METADATA].len(), 64);

    s.put("batches/000001/r0-c1-d0/s0.proof", vec![1; 10]).await.unwrap();
    s.put("batches/000002/batch.bin", vec![2; 10]).await.unwrap();
    // Another cluster's prefix in the same bucket is not touched.
    let other = store(&moto, "cluster/b", "").await;
    other.put(key, b"b".to_vec()).await.unwrap();
    assert_eq!(s.delete_prefix("batches/000001").await.unwrap(), 2);
    assert!(matches!(s.get(key).await, Err(ArtifactError::NotFound { .. })));
    assert_eq!(s.get("batches/000002/batch.bin").await.unwrap(), vec![2; 10]);
    assert_eq!(other.get(key).await.unwrap(), b"b");
    assert_eq!(s.delete_prefix("batches/000001").await.unwrap(), 0, "nothing left is not an error");
    for bad in ["../x", "/abs", "a//b", ""] {
        assert!(matches!(s.put(bad, vec![]).await, Err(ArtifactError::InvalidKey { .. })), "{bad}");
    }
}

#[tokio::test]
async fn a_large_object_is_uploaded_in_parts_and_reads_back_whole() {
    let moto = MotoServer::start();
    moto.make_bucket(BUCKET).await;
    let s = store(&moto, "p", "&part_size_mib=5&multipart_threshold_mib=8").await;
    let big = random_bytes(23 << 20);
    s.put("setup/node.circuit", big.clone()).await.unwrap();
    assert!(s.get("setup/node.circuit").await.unwrap() == big, "the object read back differs");
    // A multipart object's ETag ends in `-<parts>`: 23 MiB in 5 MiB parts is 5 parts.
    let head = moto.raw_client().head_object().bucket(BUCKET).key("p/setup/node.circuit").send().await.unwrap();
    assert!(head.e_tag().unwrap().trim_matches('"').ends_with("-5"), "etag {:?}", head.e_tag());
    // At the threshold or below: one PutObject.
    s.put("small", random_bytes(8 << 20)).await.unwrap();
    let head = moto.raw_client().head_object().bucket(BUCKET).key("p/small").send().await.unwrap();
    assert!(!head.e_tag().unwrap().contains('-'), "etag {:?}", head.e_tag());
}

#[tokio::test]
async fn a_corrupted_truncated_or_unchecked_object_is_a_clear_error() {
    let moto = MotoServer::start();
    moto.make_bucket(BUCKET).await;
    let s = store(&moto, "p", "").await;
    let key = "batches/000003/final.proof";
    let good = random_bytes(100_000);
    s.put(key, good.clone()).await.unwrap();
    let raw = moto.raw_client();
    let head = raw.head_object().bucket(BUCKET).key(format!("p/{key}")).send().await.unwrap();
    let metadata = head.metadata().cloned();

    // The same metadata over other bytes: one bit flipped, then the object cut short (what bit
    // rot or an interrupted copy leaves).
    let mut flipped = good.clone();
    flipped[54_321] ^= 0x10;
    for (what, bytes) in [("flipped", flipped), ("truncated", good[..60_000].to_vec())] {
        raw.put_object()
            .bucket(BUCKET)
            .key(format!("p/{key}"))
            .set_metadata(metadata.clone())
            .body(ByteStream::from(bytes.clone()))
            .send()
            .await
            .unwrap();
        match s.get(key).await {
            Err(ArtifactError::Corrupt { len, .. }) => assert_eq!(len, bytes.len(), "{what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    // No checksum at all: refused too.
    raw.put_object().bucket(BUCKET).key(format!("p/{key}")).body(ByteStream::from(good.clone())).send().await.unwrap();
    let e = s.get(key).await.unwrap_err();
    assert!(e.to_string().contains("none stored"), "{e}");
    // Written again through the store: good again.
    s.put(key, good.clone()).await.unwrap();
    assert!(s.get(key).await.unwrap() == good);
}

#[tokio::test]
async fn a_server_restart_mid_upload_fails_the_write_cleanly_and_a_retry_succeeds() {
    let mut moto = MotoServer::start();
    moto.make_bucket(BUCKET).await;
    let port = moto.port();
    // Few attempts, short limits: the test is about what is left behind, not about waiting.
    let s = store(&moto, "p", "&part_size_mib=5&multipart_threshold_mib=5&max_attempts=3&attempt_timeout_secs=10").await;
    let big = random_bytes(200 << 20);
    let key = "batches/000004/r0-c1-d0/s0.input";
    let upload = {
        let (s, big) = (s.clone(), big.clone());
        tokio::spawn(async move { s.put(key, big).await })
    };
    // Kill the server once the upload is under way (moto takes well over a second for 200 MiB).
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!upload.is_finished(), "the upload ended before the restart: make the object larger");
    moto.kill();
    drop(moto);
    moto = MotoServer::start_on(port);
    moto.make_bucket(BUCKET).await;

    let result = upload.await.unwrap();
    let e = result.expect_err("an upload cut by a restart cannot have completed");
    assert!(matches!(e, ArtifactError::Io { .. }), "{e}");
    // Nothing half-written is visible.
    assert!(matches!(s.get(key).await, Err(ArtifactError::NotFound { .. })));
    // The job's retry writes it whole.
    s.put(key, big.clone()).await.unwrap();
    assert!(s.get(key).await.unwrap() == big);
}
