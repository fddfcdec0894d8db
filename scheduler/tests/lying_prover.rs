//! A prover that hands in wrong proofs (`--fault-wrong-proofs`: one byte of each proof flipped)
//! among real processes on 127.0.0.1: the next round's witness generator checks each input
//! proof natively and reports the bad ones, the scheduler has those jobs proven again, strikes
//! and quarantines the liar; an honest prover started later proves them, and the batch's final
//! proof verifies. Needs the workspace's binaries and `DATABASE_URL` (`make test` provides both).

mod common;
mod procs;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proofmesh_proto::v1;
use procs::{free_port, Procs};

fn bin(name: &str) -> PathBuf {
    // target/<profile>/deps/<test binary> -> target/<profile>
    let p = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join(name);
    assert!(p.exists(), "{} is missing: build the binaries first (`cargo build --workspace --bins`)", p.display());
    p
}

fn spawn(procs: &mut Procs, logs: &Path, name: &str, program: &str, args: &[&str]) {
    let log = std::fs::File::create(logs.join(format!("{name}.log"))).unwrap();
    procs.add(name, Command::new(bin(program)).args(args).env("RUST_LOG", "info").stdout(Stdio::null()).stderr(log).spawn().unwrap());
}

fn logs_of(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        out += &format!("--- {}\n{}\n", e.path().display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    out
}

#[test]
fn a_lying_prover_is_caught_its_jobs_proven_elsewhere_and_it_is_quarantined() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (pool, db_url) = rt.block_on(common::fresh_database());
    let tmp = tempfile::tempdir().unwrap();
    let (data, inbox, outbox, logs) = (tmp.path().join("data"), tmp.path().join("inbox"), tmp.path().join("outbox"), tmp.path().join("logs"));
    for d in [&data, &inbox, &outbox, &logs] {
        std::fs::create_dir_all(d).unwrap();
    }
    let setup = Path::new(env!("CARGO_TARGET_TMPDIR")).join("setup-cache");
    let batch = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/batch_000001.bin");
    std::fs::copy(&batch, inbox.join("batch_000001.bin")).unwrap();
    let port = free_port();
    let scheduler = format!("http://127.0.0.1:{port}");
    let (d, s) = (data.to_str().unwrap(), setup.to_str().unwrap());
    // Every process the test starts is in `procs`: killed when it is dropped, a failure included.
    let mut procs = Procs::default();
    spawn(&mut procs, &logs, "scheduler", "proofmesh-scheduler", &[
        "--listen", &format!("127.0.0.1:{port}"), "--database-url", &db_url, "--artifacts", d, "--geometry", "small",
        "--quarantine-after-strikes", "1",
    ]);
    // The scheduler started here is what answers on the port (not another process that took it).
    procs.wait_listening("scheduler", port).unwrap_or_else(|e| panic!("{e}\n{}", logs_of(&logs)));
    let worker = |name: &str, role: &str| -> Vec<String> {
        ["--role", role, "--name", name, "--scheduler", &scheduler, "--artifacts", d, "--setup-dir", s].iter().map(|x| x.to_string()).collect()
    };
    for (name, role) in [("wg", "witness-generator"), ("wvg", "wvg")] {
        let args = worker(name, role);
        spawn(&mut procs, &logs, name, "proofmesh-worker", &args.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let mut liar = worker("liar", "prover");
    liar.push("--fault-wrong-proofs".into());
    spawn(&mut procs, &logs, "liar", "proofmesh-worker", &liar.iter().map(String::as_str).collect::<Vec<_>>());
    spawn(&mut procs, &logs, "compressor", "proofmesh-compressor", &["--setup-dir", s, "run", "--scheduler", &scheduler, "--artifacts", d]);
    let gateway = Command::new(bin("proofmesh-gateway"))
        .args(["--scheduler", &scheduler, "--artifacts", d, "--inbox", inbox.to_str().unwrap(), "--outbox", outbox.to_str().unwrap(), "--once"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(logs.join("gateway.log")).unwrap())
        .spawn()
        .unwrap();
    procs.add("gateway", gateway);

    // The only prover lies: the leaf round's witness generator rejects its basic proofs, and it
    // is quarantined at its first strike.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let quarantined: i64 =
            rt.block_on(sqlx::query_scalar("SELECT count(*) FROM quarantined_workers WHERE worker_name = 'liar'").fetch_one(&pool)).unwrap();
        if quarantined == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the liar was never quarantined\n{}", logs_of(&logs));
        std::thread::sleep(Duration::from_millis(300));
    }
    // Now an honest prover: the rejected jobs (and everything after them) are proven by it.
    let honest = worker("honest", "prover");
    spawn(&mut procs, &logs, "honest", "proofmesh-worker", &honest.iter().map(String::as_str).collect::<Vec<_>>());
    let status = procs.wait("gateway");
    assert!(status.success(), "the batch did not prove\n{}", logs_of(&logs));

    let proof = outbox.join("batch_000001.proof");
    let verified = Command::new(bin("proofmesh-compressor"))
        .args(["--setup-dir", s, "verify", "--proof", proof.to_str().unwrap(), "--batch", batch.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stdout));

    // Every rejected lease's job was then proven by the honest prover (the connection that
    // handed the winning result in: `jobs.leased_to` names the WVG when the prover's take-over
    // heartbeat came after its result); the liar has its strikes.
    let rejected: Vec<(i64, String)> = rt
        .block_on(
            sqlx::query_as(
                "SELECT j.id, w.name FROM leases r JOIN jobs j ON j.id = r.job_id
                 JOIN leases won ON won.lease_id = j.lease_id AND won.outcome = 'succeeded'
                 JOIN workers w ON w.id = won.completed_by
                 WHERE r.outcome = 'rejected' AND j.status = 'succeeded'",
            )
            .fetch_all(&pool),
        )
        .unwrap();
    assert!(!rejected.is_empty(), "no proof was rejected\n{}", logs_of(&logs));
    assert!(rejected.iter().all(|(_, by)| by == "honest"), "proven again by {rejected:?}");
    let strikes: Vec<(String, i64)> = rt
        .block_on(sqlx::query_as("SELECT worker_name, count(*) FROM strikes GROUP BY worker_name").fetch_all(&pool))
        .unwrap();
    assert_eq!(strikes.len(), 1, "{strikes:?}");
    assert_eq!(strikes[0].0, "liar");
    assert_eq!(strikes[0].1 as usize, rejected.len(), "one strike per rejected proof");
    // Admin shows it; an operator releases it (and that is audited).
    rt.block_on(async {
        let mut admin = v1::admin_client::AdminClient::connect(scheduler.clone()).await.unwrap();
        let workers = admin.list_workers(v1::ListWorkersRequest {}).await.unwrap().into_inner().workers;
        let liar = workers.iter().find(|w| w.name == "liar").expect("the liar is connected");
        assert!(liar.quarantined && liar.strikes >= 1, "{liar:?}");
        assert!(workers.iter().filter(|w| w.name != "liar").all(|w| !w.quarantined && w.strikes == 0));
        let released = admin.release_worker(v1::ReleaseWorkerRequest { worker: "liar".into() }).await.unwrap().into_inner().workers;
        assert!(released.iter().all(|w| !w.quarantined) && !released.is_empty());
        let log = admin.list_audit_log(v1::ListAuditLogRequest { limit: 1 }).await.unwrap().into_inner().entries;
        assert_eq!((log[0].method.as_str(), log[0].outcome.as_str()), ("ReleaseWorker", "ok"));
    });
}
