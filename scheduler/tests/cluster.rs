//! The whole cluster as separate processes on 127.0.0.1: scheduler, witness generator, WVG,
//! prover, compressor and gateway. A sample batch goes in at the gateway's inbox beside a file
//! that is not a batch; the batch comes out as a final proof that `proofmesh-compressor verify`
//! accepts, and the other file as an `.error`. Needs the workspace's binaries (`make test`
//! builds them first) and `DATABASE_URL`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

/// Kills the processes it holds when dropped, so a failing test leaves nothing running.
struct Procs(Vec<(String, Child)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

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

fn spawn(procs: &mut Procs, logs: &Path, name: &str, program: &str, args: &[&str]) {
    let log = std::fs::File::create(logs.join(format!("{name}.log"))).unwrap();
    let child = Command::new(bin(program))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    procs.0.push((name.into(), child));
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn cluster_proves_a_batch_across_processes_and_rejects_a_malformed_file() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_pool, db_url) = rt.block_on(common::fresh_database());
    let tmp = tempfile::tempdir().unwrap();
    let (data, inbox, outbox, logs) =
        (tmp.path().join("data"), tmp.path().join("inbox"), tmp.path().join("outbox"), tmp.path().join("logs"));
    for d in [&data, &inbox, &outbox, &logs] {
        std::fs::create_dir_all(d).unwrap();
    }
    // Shared with the proof-tree tests: small-geometry setup data is built once per target dir.
    let setup = Path::new(env!("CARGO_TARGET_TMPDIR")).join("setup-cache");
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples");
    let batch = samples.join("batch_000001.bin");
    std::fs::copy(&batch, inbox.join(".batch_000001.bin")).unwrap();
    std::fs::rename(inbox.join(".batch_000001.bin"), inbox.join("batch_000001.bin")).unwrap();
    std::fs::write(inbox.join("batch_garbage.bin"), b"PMBT but not really a batch").unwrap();

    let port = free_port();
    let scheduler = format!("http://127.0.0.1:{port}");
    let (d, s) = (data.to_str().unwrap(), setup.to_str().unwrap());
    let mut procs = Procs(vec![]);
    let listen = format!("127.0.0.1:{port}");
    spawn(&mut procs, &logs, "scheduler", "proofmesh-scheduler", &[
        "--listen", &listen, "--database-url", &db_url, "--data-dir", d, "--geometry", "small",
    ]);
    let worker = |role: &str, zone: &str| -> Vec<String> {
        ["--role", role, "--scheduler", &scheduler, "--zone", zone, "--data-dir", d, "--setup-dir", s]
            .iter()
            .map(|x| x.to_string())
            .collect()
    };
    for (name, role, zone) in [("wg", "witness-generator", "a"), ("wvg-a", "wvg", "a"), ("prover-a", "prover", "a")] {
        let args = worker(role, zone);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn(&mut procs, &logs, name, "proofmesh-worker", &args);
    }
    spawn(&mut procs, &logs, "compressor", "proofmesh-compressor", &[
        "--setup-dir", s, "run", "--scheduler", &scheduler, "--data-dir", d,
    ]);

    let start = Instant::now();
    let gateway = Command::new(bin("proofmesh-gateway"))
        .args(["--scheduler", &scheduler, "--data-dir", d, "--inbox", inbox.to_str().unwrap(), "--outbox", outbox.to_str().unwrap(), "--once"])
        .stderr(std::fs::File::create(logs.join("gateway.log")).unwrap())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&gateway.stdout).to_string();
    assert_eq!(gateway.status.code(), Some(1), "the gateway reports the rejected file\n{report}\n{}", logs_of(&logs));
    eprintln!("batch proven through the cluster in {:.1} s\n{report}", start.elapsed().as_secs_f64());

    let proof = outbox.join("batch_000001.proof");
    assert!(proof.exists(), "no proof in the outbox\n{report}\n{}", logs_of(&logs));
    let error = std::fs::read_to_string(outbox.join("batch_garbage.error")).expect("the malformed file gets an .error");
    assert!(error.contains("batch format"), "{error}");
    assert!(inbox.join("rejected/batch_garbage.bin").exists(), "the malformed file is moved aside");
    let summary = std::fs::read_to_string(outbox.join("batch_000001.json")).unwrap();
    assert!(summary.contains("\"proven\""), "{summary}");

    let verify = |batch: &Path| {
        Command::new(bin("proofmesh-compressor"))
            .args(["--setup-dir", s, "verify", "--proof", proof.to_str().unwrap(), "--batch", batch.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let ok = verify(&batch);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
    // The same proof does not prove another batch.
    let other = verify(&samples.join("batch_000002.bin"));
    assert_eq!(other.status.code(), Some(1), "{}", String::from_utf8_lossy(&other.stdout));

    // Every process is still up: nothing crashed along the way.
    for (name, c) in &mut procs.0 {
        assert!(c.try_wait().unwrap().is_none(), "{name} exited\n{}", logs_of(&logs));
    }
}
