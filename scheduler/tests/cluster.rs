//! The whole cluster as separate processes on 127.0.0.1: scheduler, witness generator, WVG,
//! prover, compressor and gateway, their artifacts in an S3 bucket (a real S3-protocol server,
//! moto_server). A sample batch goes in at the gateway's inbox beside a file that is not a
//! batch; the batch comes out as a final proof that `proofmesh-compressor verify` accepts, and
//! the other file as an `.error`. The compressor starts with an empty setup directory and
//! fetches its setup data from the bucket. Then two more batches come from a simulated L2 node
//! over the proof data API (`scripts/l2-node-sim.py`), one through a gateway in client mode and
//! one through a gateway in server mode, and their proofs, back at the node, verify. Every process serves `/metrics`: while the batch
//! proves, the scheduler's queue depth must match the jobs in the database, and each process's
//! metrics must parse with the Prometheus client (PyPI `prometheus_client`). Needs the
//! workspace's binaries and `DATABASE_URL` (`make test` provides both) and the test tools
//! (`scripts/test-tools.sh`). Every gRPC connection is mutual TLS: each process has its own
//! certificate from a throwaway CA (`TestCa`), named after it; the test's `Admin` client is an admin.

mod common;
mod procs;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use proofmesh_artifacts::test_server::{self, MotoServer};
use proofmesh_artifacts::{ArtifactsUrl, S3Store};
use proofmesh_circuits::setup::{CircuitKey, SetupStore};
use proofmesh_core::{keys, ArtifactStore, Geometry, ProtocolVersion};
use proofmesh_proto::tls::test_ca::TestCa;
use procs::{free_port, Procs};

fn bin_dir() -> PathBuf {
    // target/<profile>/deps/<test binary> -> target/<profile>
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} is missing: build the binaries first (`cargo build --workspace --bins`, as `make test` does)", p.display());
    p
}

/// The test's CA; every process gets a certificate `CN=<its name>` from it.
static CA: OnceLock<TestCa> = OnceLock::new();

/// A command for one of the workspace's binaries, with the test bucket's credentials and TLS
/// files of its own (`CN=<name>`).
fn command(program: &str, name: &str) -> Command {
    let mut c = Command::new(bin(program));
    let tls = CA.get().expect("the CA is made first").issue(name, &format!("CN={name}")).unwrap();
    c.env("AWS_ACCESS_KEY_ID", test_server::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", test_server::SECRET_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("PROOFMESH_TLS_CERT", tls.cert)
        .env("PROOFMESH_TLS_KEY", tls.key)
        .env("PROOFMESH_TLS_CA", tls.ca);
    c
}

fn spawn(procs: &mut Procs, logs: &Path, name: &str, program: &str, args: &[&str]) {
    let log = std::fs::File::create(logs.join(format!("{name}.log"))).unwrap();
    let child = command(program, name)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    procs.add(name, child);
}

fn logs_of(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        out += &format!("--- {} (last lines)\n", e.path().display());
        for l in tail.into_iter().rev() {
            out += l;
            out.push('\n');
        }
    }
    out
}

/// `GET /metrics` from 127.0.0.1:`port` (plain HTTP/1.0); `None` if it does not answer.
fn scrape(port: u16) -> Option<String> {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    c.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string()).or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_string()))
}

/// One sample: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses Prometheus text with the reference client's parser (`prometheus_client`, Python).
fn parse_metrics(text: &str) -> Vec<Sample> {
    const PARSE: &str = "import json, sys\nfrom prometheus_client.parser import text_string_to_metric_families\n\
        print(json.dumps([[s.name, s.labels, s.value] for f in text_string_to_metric_families(sys.stdin.read()) for s in f.samples]))";
    let mut child = Command::new("python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (`make test` puts .venv/bin first on PATH)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client could not parse the metrics (is it installed? scripts/test-tools.sh): {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<(String, BTreeMap<String, String>, f64)>>(&out.stdout).unwrap()
}

/// Sum of `name`'s samples with label `key` = `value`.
fn sum(samples: &[Sample], name: &str, key: &str, value: &str) -> f64 {
    samples.iter().filter(|(n, l, _)| n == name && l.get(key).map(String::as_str) == Some(value)).map(|(_, _, v)| v).sum()
}

#[test]
fn cluster_proves_a_batch_across_processes_and_rejects_a_malformed_file() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (pool, db_url) = rt.block_on(common::fresh_database());
    let tmp = tempfile::tempdir().unwrap();
    let (inbox, outbox, logs, compressor_setup) =
        (tmp.path().join("inbox"), tmp.path().join("outbox"), tmp.path().join("logs"), tmp.path().join("compressor-setup"));
    for d in [&inbox, &outbox, &logs] {
        std::fs::create_dir_all(d).unwrap();
    }
    let ca = CA.get_or_init(|| TestCa::new(&tmp.path().join("certs"), "cluster test CA").unwrap());
    let admin_tls = proofmesh_proto::TlsArgs::with_files(ca.issue("operator", "CN=operator,OU=admins").unwrap(), 30);
    // Shared with the proof-tree tests: small-geometry setup data is built once per target dir.
    let setup = Path::new(env!("CARGO_TARGET_TMPDIR")).join("setup-cache");
    let moto = MotoServer::start();
    rt.block_on(moto.make_bucket("cluster"));
    let artifacts = moto.url("cluster", "e2e", "");
    // The compression stage's setup files in the bucket, as a worker that built them publishes
    // them (`ArtifactMirror`): the compressor, whose setup directory is empty, must fetch them.
    rt.block_on(async {
        let local = SetupStore::new(&setup, ProtocolVersion::CURRENT, Geometry::small()).unwrap();
        local.verifier(CircuitKey::Compression).unwrap();
        let ArtifactsUrl::S3(loc) = artifacts.parse().unwrap() else { unreachable!() };
        let bucket = S3Store::connect(loc, Some(MotoServer::credentials())).await.unwrap();
        let folder = local.folder().file_name().unwrap().to_str().unwrap().to_string();
        for file in ["compression.circuit", "compression.verifier", "scheduler.verifier"] {
            let bytes = std::fs::read(local.folder().join(file)).unwrap();
            bucket.put(&keys::setup_file(&format!("{folder}/{file}")), bytes).await.unwrap();
        }
    });
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples");
    let batch = samples.join("batch_000001.bin");
    std::fs::copy(&batch, inbox.join(".batch_000001.bin")).unwrap();
    std::fs::rename(inbox.join(".batch_000001.bin"), inbox.join("batch_000001.bin")).unwrap();
    std::fs::write(inbox.join("batch_garbage.bin"), b"PMBT but not really a batch").unwrap();

    let port = free_port();
    let scheduler = format!("http://127.0.0.1:{port}");
    let (d, s) = (artifacts.as_str(), setup.to_str().unwrap());
    // Every process the test starts is in `procs`: killed when it is dropped, a failure included.
    let mut procs = Procs::default();
    let listen = format!("127.0.0.1:{port}");
    // Each process's metrics port.
    let metrics: BTreeMap<&str, u16> =
        ["scheduler", "wg", "wvg-a", "prover-a", "compressor", "gateway"].into_iter().map(|n| (n, free_port())).collect();
    let metrics_at = |name: &str| format!("127.0.0.1:{}", metrics[name]);
    spawn(&mut procs, &logs, "scheduler", "proofmesh-scheduler", &[
        "--listen", &listen, "--database-url", &db_url, "--artifacts", d, "--geometry", "small",
        "--metrics-listen", &metrics_at("scheduler"), "--admin-subject", "OU=admins",
    ]);
    // The scheduler started here is what answers on the port (not another process that took it).
    procs.wait_listening("scheduler", port).unwrap_or_else(|e| panic!("{e}\n{}", logs_of(&logs)));
    let worker = |name: &str, role: &str, zone: &str| -> Vec<String> {
        ["--role", role, "--scheduler", &scheduler, "--zone", zone, "--artifacts", d, "--setup-dir", s, "--metrics-listen", &metrics_at(name)]
            .iter()
            .map(|x| x.to_string())
            .collect()
    };
    for (name, role, zone) in [("wg", "witness-generator", "a"), ("wvg-a", "wvg", "a"), ("prover-a", "prover", "a")] {
        let mut args = worker(name, role, zone);
        if role != "witness-generator" {
            // The version a fresh database knows: declared, so registration checks it.
            args.extend(["--protocol-version".to_string(), "0.1.0".to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn(&mut procs, &logs, name, "proofmesh-worker", &args);
    }
    spawn(&mut procs, &logs, "compressor", "proofmesh-compressor", &[
        "--setup-dir", compressor_setup.to_str().unwrap(), "run", "--scheduler", &scheduler, "--artifacts", d,
        "--metrics-listen", &metrics_at("compressor"),
    ]);

    let start = Instant::now();
    let gateway = command("proofmesh-gateway", "gateway")
        .args(["--scheduler", &scheduler, "--artifacts", d, "--inbox", inbox.to_str().unwrap(), "--outbox", outbox.to_str().unwrap(), "--once"])
        .args(["--metrics-listen", &metrics_at("gateway")])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(logs.join("gateway.log")).unwrap())
        .spawn()
        .unwrap();
    procs.add("gateway", gateway);
    // While the batch proves: the scheduler's queue depth against the database, until they agree
    // on a moment with work outstanding (the gauges refresh every 2 s; jobs last seconds).
    let mut agreed = None;
    let mut gateway_metrics = None;
    while procs.get("gateway").try_wait().unwrap().is_none() {
        if let Some(text) = scrape(metrics["gateway"]) {
            gateway_metrics = Some(text);
        }
        if agreed.is_none() {
            let in_db: Vec<(String, i64)> = rt.block_on(
                sqlx::query_as("SELECT status, count(*) FROM jobs WHERE status IN ('waiting', 'queued', 'leased') GROUP BY status")
                    .fetch_all(&pool),
            )
            .unwrap();
            if let Some(text) = scrape(metrics["scheduler"]) {
                let samples = parse_metrics(&text);
                let gauge = |status: &str| sum(&samples, "proofmesh_queue_depth", "status", status) as i64;
                let db = |status: &str| in_db.iter().find(|(s, _)| s == status).map_or(0, |(_, n)| *n);
                let statuses = ["waiting", "queued", "leased"];
                if statuses.iter().all(|st| gauge(st) == db(st)) && statuses.iter().any(|st| db(st) > 0) {
                    agreed = Some(statuses.map(db));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let gateway = procs.take("gateway").wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&gateway.stdout).to_string();
    let agreed = agreed.unwrap_or_else(|| panic!("the queue depth never matched the database while the batch proved\n{}", logs_of(&logs)));
    eprintln!("queue depth matched the database at waiting/queued/leased = {agreed:?}");
    assert_eq!(gateway.status.code(), Some(1), "the gateway reports the rejected file\n{report}\n{}", logs_of(&logs));
    eprintln!("batch proven through the cluster in {:.1} s\n{report}", start.elapsed().as_secs_f64());

    let proof = outbox.join("batch_000001.proof");
    assert!(proof.exists(), "no proof in the outbox\n{report}\n{}", logs_of(&logs));
    let error = std::fs::read_to_string(outbox.join("batch_garbage.error")).expect("the malformed file gets an .error");
    assert!(error.contains("batch format"), "{error}");
    assert!(inbox.join("rejected/batch_garbage.bin").exists(), "the malformed file is moved aside");
    let summary = std::fs::read_to_string(outbox.join("batch_000001.json")).unwrap();
    assert!(summary.contains("\"proven\""), "{summary}");

    let verify = |proof: &Path, batch: &Path| {
        Command::new(bin("proofmesh-compressor"))
            .args(["--setup-dir", s, "verify", "--proof", proof.to_str().unwrap(), "--batch", batch.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let ok = verify(&proof, &batch);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
    // The same proof does not prove another batch.
    let other = verify(&proof, &samples.join("batch_000002.bin"));
    assert_eq!(other.status.code(), Some(1), "{}", String::from_utf8_lossy(&other.stdout));

    // The L2 node's proof data API, both ways, over HTTP on loopback with the simulated node
    // (scripts/l2-node-sim.py): batch 2 is fetched by a gateway in client mode, batch 3 pushed
    // to a gateway in server mode; both proofs come back to the node and verify.
    let sim = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/l2-node-sim.py");
    let generated = proofmesh_circuits::sample::generate_batches(7, 16, &[2, 3], 2).unwrap();
    let node_dir = |name: &str, batch: &proofmesh_circuits::batch::Batch| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(dir.join("batches")).unwrap();
        std::fs::write(dir.join(format!("batches/batch_{:06}.bin", batch.number.0)), batch.to_bytes()).unwrap();
        dir
    };
    let (client_node, server_node) = (node_dir("node-client", &generated[0]), node_dir("node-server", &generated[1]));
    let (node_port, gateway_port) = (free_port(), free_port());
    let node_sim = |dir: &Path, args: &[&str]| {
        Command::new("python3")
            .arg(&sim)
            .args(args)
            .args(["--batches", dir.join("batches").to_str().unwrap(), "--out", dir.join("out").to_str().unwrap()])
            .args(["--timeout-secs", "900"])
            .stdout(std::fs::File::create(dir.join("node.log")).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    };
    procs.add("node-client", node_sim(&client_node, &["serve", "--listen", &format!("127.0.0.1:{node_port}"), "--exit-when-done"]));
    procs.wait_listening("node-client", node_port).unwrap_or_else(|e| panic!("{e}\n{}", logs_of(&logs)));
    spawn(&mut procs, &logs, "gateway-client", "proofmesh-gateway", &[
        "--mode", "client", "--scheduler", &scheduler, "--artifacts", d,
        "--l2-node-url", &format!("http://127.0.0.1:{node_port}"), "--poll-interval-ms", "200",
    ]);
    spawn(&mut procs, &logs, "gateway-server", "proofmesh-gateway", &[
        "--mode", "server", "--scheduler", &scheduler, "--artifacts", d, "--listen", &format!("127.0.0.1:{gateway_port}"),
    ]);
    procs.wait_listening("gateway-server", gateway_port).unwrap_or_else(|e| panic!("{e}\n{}", logs_of(&logs)));
    procs.add("node-server", node_sim(&server_node, &["push", "--gateway", &format!("http://127.0.0.1:{gateway_port}"), "--poll-interval-ms", "200"]));
    let node_log = |dir: &Path| std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
    for (dir, node, batch) in [(&client_node, "node-client", &generated[0]), (&server_node, "node-server", &generated[1])] {
        let status = procs.wait(node);
        assert!(status.success(), "the node simulator in {} failed\n{}\n{}", dir.display(), node_log(dir), logs_of(&logs));
        let stem = format!("batch_{:06}", batch.number.0);
        let ok = verify(&dir.join(format!("out/{stem}.proof")), &dir.join(format!("batches/{stem}.bin")));
        assert!(ok.status.success(), "{}: {}", dir.display(), String::from_utf8_lossy(&ok.stdout));
    }

    // Every process's metrics parse, and say what it did.
    let of = |name: &str| parse_metrics(&scrape(metrics[name]).unwrap_or_else(|| panic!("{name} serves no metrics")));
    let scheduler_m = of("scheduler");
    assert!(sum(&scheduler_m, "proofmesh_jobs_total", "outcome", "succeeded") >= 13.0, "every job's success is counted");
    assert!(sum(&scheduler_m, "proofmesh_workers", "role", "prover") >= 1.0);
    assert!(scheduler_m.iter().any(|(n, _, _)| n == "proofmesh_lease_wait_seconds_count"));
    assert!(scheduler_m.iter().any(|(n, _, _)| n == "proofmesh_oldest_queued_job_age_seconds"));
    for (name, stage) in [("wg", "witness_generation"), ("wvg-a", "witness_vector"), ("prover-a", "proving"), ("compressor", "compression")] {
        let m = of(name);
        assert!(sum(&m, "proofmesh_job_duration_seconds_count", "stage", stage) >= 1.0, "{name}: no {stage} durations");
    }
    let sent = sum(&of("wvg-a"), "proofmesh_witness_vector_bytes_total", "direction", "sent");
    let received = sum(&of("prover-a"), "proofmesh_witness_vector_bytes_total", "direction", "received");
    assert!(sent > 0.0 && sent == received, "witness-vector bytes sent {sent}, received {received}");
    let gateway_m = parse_metrics(&gateway_metrics.expect("the gateway served metrics while it ran"));
    assert!(sum(&gateway_m, "proofmesh_gateway_batches_total", "outcome", "rejected") >= 1.0, "the malformed file is counted");

    // The prover reported the setups it loaded (setup-data affinity) and its declared version.
    let workers = rt.block_on(async {
        let channel = admin_tls.endpoint(&scheduler).unwrap().connect().await.unwrap();
        let mut admin = proofmesh_proto::v1::admin_client::AdminClient::new(channel);
        admin.list_workers(proofmesh_proto::v1::ListWorkersRequest {}).await.unwrap().into_inner().workers
    });
    let prover = workers.iter().find(|w| w.role == proofmesh_proto::v1::Role::Prover as i32).expect("the prover is connected");
    assert!(!prover.loaded_setups.is_empty(), "the prover reports its loaded setups: {prover:?}");
    assert_eq!(prover.protocol_versions, [proofmesh_proto::v1::ProtocolVersion { minor: 1, patch: 0 }]);
    assert_eq!(prover.identity, "CN=prover-a", "the prover's certificate identity");

    // The compressor fetched its setup data from the bucket instead of building it.
    let compressor_log = std::fs::read_to_string(logs.join("compressor.log")).unwrap();
    assert!(
        compressor_log.contains("setup data fetched from the artifact store") && compressor_log.contains("compression.circuit"),
        "the compressor did not fetch its setup data\n{compressor_log}"
    );
    // The batch's artifacts are objects under the bucket's prefix.
    let listed = rt.block_on(moto.raw_client().list_objects_v2().bucket("cluster").prefix("e2e/batches/000001/").send()).unwrap();
    assert!(listed.contents().iter().any(|o| o.key() == Some("e2e/batches/000001/final.proof")), "{listed:?}");

    // Every process is still up: nothing crashed along the way.
    for (name, c) in procs.iter_mut() {
        assert!(c.try_wait().unwrap().is_none(), "{name} exited\n{}", logs_of(&logs));
    }
}
