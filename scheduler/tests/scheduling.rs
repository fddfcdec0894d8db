//! Scheduling policy against a real PostgreSQL over real gRPC (docs/scheduling.md): prover
//! groups, protocol versions (two fleets through an upgrade), order and ageing, setup-data
//! affinity, memory budgets, a long mixed run without starvation, prover slots as the provers
//! report them, and a batch proven only on a final proof verified against it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use proofmesh_proto::v1::{self, scheduler_client::SchedulerClient, worker_message, Role};
use proofmesh_scheduler::{JobWeights, Policy, ProverGroups, Settings};
use proofmesh_worker::lease::{LeaseClient, Registration};
use tokio_util::sync::CancellationToken;

const GROUPS: &str = "
[[group]]
id = 1
circuits = [{ aggregation_round = 0, circuit_id = 1 }]

[[group]]
id = 2
circuits = [{ aggregation_round = 0, circuit_id = 2 }, { aggregation_round = 0, circuit_id = 3 }]
";

fn grouped(role: Role, zone: &str, capacity: u32, endpoint: &str, group: Option<u32>) -> v1::Register {
    v1::Register { prover_group: group, ..register(role, zone, "h", capacity, endpoint) }
}

/// The code and message a registration is refused with.
async fn refusal(url: &str, reg: v1::Register) -> (tonic::Code, String) {
    let mut client = SchedulerClient::connect(url.to_string()).await.unwrap();
    let first = v1::WorkerMessage { msg: Some(worker_message::Msg::Register(reg)) };
    let status = client.work(tokio_stream::iter(vec![first])).await.expect_err("the registration must be refused");
    (status.code(), status.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_take_only_their_prover_groups_pairs_and_an_unknown_group_is_refused() {
    let groups = ProverGroups::parse(GROUPS).unwrap();
    let s = start_scheduler_with(Settings { prover_groups: Some(groups), ..settings() }).await;
    let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h", 1, "")).await;
    wg.credit(1);
    submit(&s.url, 1).await;
    let l = wg.lease().await;
    // Round 0: one circuit of each type 1, 2, 3.
    wg.complete(&l.lease_id, &[(1, 1), (2, 1), (3, 1)]);

    // A group-1 prover and a group-2 WVG share no pair: nothing is leased.
    let p1 = RawWorker::connect(&s.url, grouped(Role::Prover, "a", 4, "http://p1:1", Some(1))).await;
    let mut w2 = RawWorker::connect(&s.url, grouped(Role::Wvg, "a", 4, "", Some(2))).await;
    w2.credit(4);
    assert!(w2.next(Duration::from_millis(500)).await.is_none(), "no prover of group 2 is connected");

    // A group-1 WVG gets the one circuit-1 job, with the group-1 prover, and nothing else.
    let mut w1 = RawWorker::connect(&s.url, grouped(Role::Wvg, "a", 4, "", Some(1))).await;
    w1.credit(4);
    let only = w1.lease().await;
    assert_eq!(only.job.as_ref().map(|j| (j.aggregation_round, j.circuit_id)), Some((0, 1)));
    assert_eq!(only.prover_worker_id, p1.id);
    assert!(w1.next(Duration::from_millis(500)).await.is_none(), "group 1 has no other pair");

    // A prover without a group takes every pair: the group-2 WVG gets circuits 2 and 3 with it.
    let p_any = RawWorker::connect(&s.url, grouped(Role::Prover, "a", 4, "http://p-any:1", None)).await;
    let mut got = [w2.lease().await, w2.lease().await];
    got.sort_by_key(|l| l.job.as_ref().unwrap().circuit_id);
    assert_eq!(got.iter().map(|l| l.job.as_ref().unwrap().circuit_id).collect::<Vec<_>>(), vec![2, 3]);
    assert!(got.iter().all(|l| l.prover_worker_id == p_any.id));

    // Admin shows the groups.
    let mut admin = v1::admin_client::AdminClient::connect(s.url.clone()).await.unwrap();
    let workers = admin.list_workers(v1::ListWorkersRequest {}).await.unwrap().into_inner().workers;
    assert_eq!(workers.iter().find(|w| w.id == w1.id).unwrap().prover_group, Some(1));
    assert_eq!(workers.iter().find(|w| w.id == p_any.id).unwrap().prover_group, None);

    // Refused clearly: an unknown group, and a group on a role that takes none.
    let (code, message) = refusal(&s.url, grouped(Role::Wvg, "a", 1, "", Some(9))).await;
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(message.contains("unknown prover group 9") && message.contains("[1, 2]"), "{message}");
    let (code, message) = refusal(&s.url, grouped(Role::WitnessGenerator, "a", 1, "", Some(1))).await;
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(message.contains("groups are for WVGs and provers"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refused_for_its_group_stops_with_the_reason_instead_of_retrying() {
    let s = start_scheduler_with(settings()).await;
    let reg = Registration {
        scheduler: s.url.clone(),
        role: Role::Wvg,
        name: "w".into(),
        zone: "a".into(),
        region: "r".into(),
        host: "h".into(),
        capacity: 1,
        prover_endpoint: String::new(),
        protocol_versions: vec![],
        prover_group: Some(3),
        memory_budget_mib: 0,
        tls: Default::default(),
    };
    let stop = CancellationToken::new();
    let (client, mut leases) = LeaseClient::start(reg, stop.clone());
    tokio::time::timeout(Duration::from_secs(10), client.refused().cancelled()).await.expect("refused at once, not retried");
    let reason = client.refusal().unwrap();
    assert!(reason.contains("prover group 3") && reason.contains("no --prover-groups file"), "{reason}");
    assert!(leases.recv().await.is_none(), "the lease stream ends");
    stop.cancel();
}

// ------------------------------------------------------------------ protocol versions

/// `0.minor.patch` as the API names it.
fn version(minor: u32, patch: u32) -> v1::ProtocolVersion {
    v1::ProtocolVersion { minor, patch }
}

/// Submits batch `n` of `v` with `priority`; the gRPC status if refused.
async fn submit_as(url: &str, n: u32, v: v1::ProtocolVersion, priority: i32) -> Result<bool, tonic::Status> {
    let mut batches = v1::batches_client::BatchesClient::connect(url.to_string()).await.unwrap();
    let r = v1::SubmitBatchRequest {
        batch_number: n,
        protocol_version: Some(v),
        input_key: proofmesh_core::keys::batch_input(proofmesh_core::BatchNumber(n)),
        priority,
        content_sha256: vec![],
    };
    batches.submit_batch(r).await.map(|r| r.into_inner().created)
}

async fn admin(url: &str) -> v1::admin_client::AdminClient<tonic::transport::Channel> {
    v1::admin_client::AdminClient::connect(url.to_string()).await.unwrap()
}

async fn versions(url: &str) -> Vec<v1::ProtocolVersionInfo> {
    admin(url).await.list_protocol_versions(v1::ListProtocolVersionsRequest {}).await.unwrap().into_inner().versions
}

const VK: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Registers `v` (with [`VK`]).
async fn register_version(url: &str, v: v1::ProtocolVersion) -> v1::ProtocolVersionInfo {
    let r = v1::RegisterProtocolVersionRequest { version: Some(v), vk_hash: VK.into() };
    admin(url).await.register_protocol_version(r).await.unwrap().into_inner()
}

fn versioned(role: Role, capacity: u32, endpoint: &str, versions: &[v1::ProtocolVersion]) -> v1::Register {
    v1::Register { protocol_versions: versions.to_vec(), ..register(role, "a", "h", capacity, endpoint) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_leased_only_their_versions_and_a_batch_nobody_proves_waits_visibly() {
    let s = start_scheduler_with(settings()).await;
    // A fresh database knows the version of these circuits, active, with no hash recorded yet.
    let known = versions(&s.url).await;
    assert_eq!(known.len(), 1);
    assert_eq!((known[0].version, known[0].status.as_str()), (Some(version(1, 0)), "active"));

    // An unknown version is refused, with the way out in the message.
    let refused = submit_as(&s.url, 1, version(1, 1), 0).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("not registered") && refused.message().contains("RegisterProtocolVersion"), "{refused:?}");
    let mut a = admin(&s.url).await;
    let bad = a
        .register_protocol_version(v1::RegisterProtocolVersionRequest { version: Some(version(1, 1)), vk_hash: "xyz".into() })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let info = register_version(&s.url, version(1, 1)).await;
    assert_eq!((info.status.as_str(), info.vk_hash.as_str()), ("active", VK));
    let other_hash = v1::RegisterProtocolVersionRequest { version: Some(version(1, 1)), vk_hash: "f".repeat(64) };
    assert_eq!(a.register_protocol_version(other_hash).await.unwrap_err().code(), tonic::Code::FailedPrecondition);

    // A worker may declare only known versions.
    let (code, message) = refusal(&s.url, versioned(Role::WitnessGenerator, 1, "", &[version(2, 0)])).await;
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(message.contains("0.2.0"), "{message}");

    assert!(submit_as(&s.url, 1, version(1, 0), 0).await.unwrap());
    assert!(submit_as(&s.url, 2, version(1, 1), 0).await.unwrap());
    let mut new_wg = RawWorker::connect(&s.url, versioned(Role::WitnessGenerator, 1, "", &[version(1, 1)])).await;
    new_wg.credit(2);
    let l = new_wg.lease().await;
    assert_eq!((l.job.unwrap().batch_number, l.protocol_version), (2, Some(version(1, 1))));
    assert!(new_wg.next(Duration::from_millis(500)).await.is_none(), "batch 1 is 0.1.0: not for this worker");

    // Batch 1 waits, and Admin shows why: a queued job and no witness generator for 0.1.0.
    let v10 = versions(&s.url).await.into_iter().find(|v| v.version == Some(version(1, 0))).unwrap();
    assert_eq!((v10.unfinished_batches, v10.queued_jobs), (1, 1));
    assert_eq!(v10.workers.get("witness-generator"), None);
    let v11 = versions(&s.url).await.into_iter().find(|v| v.version == Some(version(1, 1))).unwrap();
    assert_eq!(v11.workers.get("witness-generator"), Some(&1));

    // Retired: no new batches of it; its unfinished batch still proves once a worker serves it.
    let retired = a.retire_protocol_version(v1::RetireProtocolVersionRequest { version: Some(version(1, 0)) }).await.unwrap();
    assert_eq!(retired.into_inner().status, "retired");
    assert_eq!(submit_as(&s.url, 3, version(1, 0), 0).await.unwrap_err().code(), tonic::Code::FailedPrecondition);
    assert!(!submit_as(&s.url, 1, version(1, 0), 0).await.unwrap(), "resubmitting an existing batch stays idempotent");
    let mut old_wg = RawWorker::connect(&s.url, versioned(Role::WitnessGenerator, 1, "", &[version(1, 0)])).await;
    old_wg.credit(1);
    let l = old_wg.lease().await;
    assert_eq!((l.job.unwrap().batch_number, l.protocol_version), (1, Some(version(1, 0))));
}

/// A fake worker of one fleet: takes leases, checks each is of its versions and (WVG) matched
/// with its own fleet's prover and within its memory budget, holds each for `hold`, then reports
/// it done (round-0 witness generation with `COUNTS`). Runs until `stop`; returns its leases.
struct Sim {
    reg: v1::Register,
    credits: u32,
    hold: Duration,
    /// Provers its WVG leases may name (its fleet's).
    provers: Vec<String>,
    /// Weight of a proving job's pair, MiB.
    weights: Vec<((u32, u32), u64)>,
}

const COUNTS: [(u32, u32); 3] = [(1, 2), (2, 1), (3, 1)];

impl Sim {
    fn new(reg: v1::Register, credits: u32) -> Self {
        Sim { reg, credits, hold: Duration::from_millis(5), provers: vec![], weights: vec![] }
    }

    fn weight(&self, job: &v1::JobIdentity) -> u64 {
        self.weights.iter().find(|(p, _)| *p == (job.aggregation_round, job.circuit_id)).map_or(0, |(_, w)| *w)
    }

    fn spawn(self, url: String, stop: CancellationToken) -> tokio::task::JoinHandle<Vec<v1::Lease>> {
        tokio::spawn(async move {
            let mut w = RawWorker::connect(&url, self.reg.clone()).await;
            w.credit(self.credits);
            let mut leases = vec![];
            let mut held: Vec<(tokio::time::Instant, v1::Lease)> = vec![];
            while !stop.is_cancelled() {
                let due = held.iter().map(|(t, _)| *t).min();
                let wait = due.map_or(Duration::from_millis(50), |t| t.saturating_duration_since(tokio::time::Instant::now()));
                if let Some(v1::scheduler_message::Msg::Lease(l)) = w.next(wait.min(Duration::from_millis(50))).await {
                    let job = l.job.unwrap();
                    let versions = &self.reg.protocol_versions;
                    assert!(versions.is_empty() || versions.contains(&l.protocol_version.unwrap()), "{l:?} is not of {versions:?}");
                    if !self.provers.is_empty() {
                        assert!(self.provers.contains(&l.prover_worker_id), "matched with another fleet's prover: {l:?}");
                    }
                    let used: u64 = held.iter().map(|(_, h)| self.weight(h.job.as_ref().unwrap())).sum::<u64>() + self.weight(&job);
                    let budget = self.reg.memory_budget_mib;
                    assert!(budget == 0 || used <= budget, "leased {used} MiB past a budget of {budget} MiB");
                    held.push((tokio::time::Instant::now() + self.hold, l.clone()));
                    leases.push(l);
                }
                let now = tokio::time::Instant::now();
                for (_, l) in held.iter().filter(|(t, _)| *t <= now) {
                    let job = l.job.as_ref().unwrap();
                    let counts: &[(u32, u32)] = if job.kind == v1::JobKind::WitnessGeneration as i32 && job.aggregation_round == 0 { &COUNTS } else { &[] };
                    w.complete(&l.lease_id, counts);
                    w.credit(1);
                }
                held.retain(|(t, _)| *t > now);
            }
            leases
        })
    }
}

/// Waits until every batch in `batches` is proven (panics after `limit`).
async fn until_proven(url: &str, batches: impl IntoIterator<Item = u32> + Clone, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut left = vec![];
        for n in batches.clone() {
            if get_batch(url, n).await.state != v1::BatchState::Proven as i32 {
                left.push(n);
            }
        }
        if left.is_empty() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "batches {left:?} not proven within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_fleets_of_different_versions_prove_every_batch_of_both_through_an_upgrade() {
    let s = start_scheduler_with(settings()).await;
    register_version(&s.url, version(1, 1)).await;
    let stop = CancellationToken::new();
    let _stop_on_panic = stop.clone().drop_guard();
    let mut fleets = vec![];
    for (v, endpoint) in [(version(1, 0), "http://old-prover:1"), (version(1, 1), "http://new-prover:1")] {
        let prover = RawWorker::connect(&s.url, versioned(Role::Prover, 2, endpoint, &[v])).await;
        let mut wvg = Sim::new(versioned(Role::Wvg, 2, "", &[v]), 2);
        wvg.provers = vec![prover.id.clone()];
        fleets.push((v, prover, vec![
            Sim::new(versioned(Role::WitnessGenerator, 2, "", &[v]), 2).spawn(s.url.clone(), stop.clone()),
            wvg.spawn(s.url.clone(), stop.clone()),
            Sim::new(versioned(Role::Compressor, 1, "", &[v]), 1).spawn(s.url.clone(), stop.clone()),
        ]));
    }
    // Old batches, then the upgrade: new ones, interleaved with the last old ones.
    for n in 1..=3 {
        submit_as(&s.url, n, version(1, 0), 0).await.unwrap();
    }
    for n in 4..=6 {
        submit_as(&s.url, n, if n == 5 { version(1, 0) } else { version(1, 1) }, 0).await.unwrap();
    }
    until_proven(&s.url, 1..=6, Duration::from_secs(60)).await;
    stop.cancel();
    for (v, _prover, workers) in fleets {
        let mut batches = std::collections::BTreeSet::new();
        for w in workers {
            for l in w.await.unwrap() {
                assert_eq!(l.protocol_version, Some(v));
                batches.insert(l.job.unwrap().batch_number);
            }
        }
        let expected: Vec<u32> = if v == version(1, 0) { vec![1, 2, 3, 5] } else { vec![4, 6] };
        assert_eq!(batches.into_iter().collect::<Vec<_>>(), expected, "fleet {v:?} proved exactly its batches");
    }
}

/// Issue 16 rule 3: a batch is proven only on a compression completion that says its final proof
/// was verified against the batch. One that does not is refused, its lease ends as a retryable
/// failure naming why, and the job is leased again; the batch stays proving until a verified one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_proven_only_on_a_final_proof_verified_against_it() {
    let s = start_scheduler_with(settings()).await;
    let stop = CancellationToken::new();
    let _stop_on_panic = stop.clone().drop_guard();
    let prover = RawWorker::connect(&s.url, register(Role::Prover, "a", "h", 2, "http://prover:1")).await;
    let mut wvg = Sim::new(register(Role::Wvg, "a", "h", 2, ""), 2);
    wvg.provers = vec![prover.id.clone()];
    let _sims = [Sim::new(register(Role::WitnessGenerator, "a", "h", 2, ""), 2).spawn(s.url.clone(), stop.clone()), wvg.spawn(s.url.clone(), stop.clone())];
    let mut compressor = RawWorker::connect(&s.url, register(Role::Compressor, "a", "h", 1, "")).await;
    compressor.credit(1);
    assert!(submit(&s.url, 1).await);
    let first = match compressor.next(Duration::from_secs(30)).await {
        Some(v1::scheduler_message::Msg::Lease(l)) => l,
        other => panic!("expected the compression lease, got {other:?}"),
    };
    // A completion that does not say it verified the final proof against the batch.
    let unverified = v1::Completed { lease_id: first.lease_id.clone(), verified_against_batch: false, ..Default::default() };
    compressor.send(worker_message::Msg::Completed(unverified));
    match compressor.next(Duration::from_secs(5)).await {
        Some(v1::scheduler_message::Msg::Refused(r)) => {
            assert_eq!(r.lease_id, first.lease_id);
            assert!(r.reason.contains("verified against the batch"), "{}", r.reason);
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert_eq!(get_batch(&s.url, 1).await.state, v1::BatchState::Proving as i32, "not proven on an unverified final proof");
    // The lease ends just after the refusal is sent.
    let ended = || async {
        sqlx::query_as::<_, (Option<String>, String)>("SELECT outcome, coalesce(error, '') FROM leases WHERE lease_id = $1")
            .bind(uuid::Uuid::parse_str(&first.lease_id).unwrap())
            .fetch_one(&s.shared.pool)
            .await
            .unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let (outcome, error) = loop {
        match ended().await {
            (Some(outcome), error) => break (outcome, error),
            (None, _) => assert!(tokio::time::Instant::now() < deadline, "the refused completion's lease never ended"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(outcome, "failed");
    assert!(error.contains("verified against the batch"), "{error}");
    // The job is leased again (one attempt of three spent), and a verified completion proves it.
    compressor.credit(1);
    let again = compressor.lease().await;
    assert_eq!(again.job, first.job);
    assert_ne!(again.lease_id, first.lease_id);
    compressor.complete(&again.lease_id, &[]);
    compressor.expect_recorded(&again.lease_id).await;
    until_proven(&s.url, [1], Duration::from_secs(5)).await;
    stop.cancel();
}

// ------------------------------------------------------------------ order

/// The batch number of the next lease `w` gets.
async fn next_batch(w: &mut RawWorker) -> u32 {
    let l = w.lease().await;
    w.complete(&l.lease_id, &COUNTS);
    l.job.unwrap().batch_number
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_then_age_then_round_and_a_waiting_batch_ages_past_higher_priorities() {
    let s = start_scheduler_with(Settings { policy: Policy { ageing_secs: 1.0, ..Policy::default() }, ..settings() }).await;
    // Priority first, then the older batch.
    submit_as(&s.url, 10, version(1, 0), 0).await.unwrap();
    submit_as(&s.url, 11, version(1, 0), 0).await.unwrap();
    submit_as(&s.url, 12, version(1, 0), 2).await.unwrap();
    let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h", 1, "")).await;
    let mut order = vec![];
    for _ in 0..3 {
        wg.credit(1);
        order.push(next_batch(&mut wg).await);
    }
    assert_eq!(order, [12, 10, 11]);

    // A later round of an old batch goes before round 0 of a new one: batch 10's basic proofs of
    // type 3 (one circuit) done, its leaf witness generation is queued beside batch 13's round 0.
    let _p = RawWorker::connect(&s.url, register(Role::Prover, "a", "h", 16, "http://p:1")).await;
    let mut wvg = RawWorker::connect(&s.url, register(Role::Wvg, "a", "h", 16, "")).await;
    wvg.credit(16);
    let mut type3_of_10 = None;
    for _ in 0..12 {
        let l = wvg.lease().await;
        let j = l.job.unwrap();
        if (j.batch_number, j.circuit_id) == (10, 3) {
            type3_of_10 = Some(l.lease_id);
        }
    }
    submit_as(&s.url, 13, version(1, 0), 0).await.unwrap();
    wvg.complete(&type3_of_10.unwrap(), &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    wg.credit(1);
    let l = wg.lease().await;
    let j = l.job.unwrap();
    assert_eq!((j.batch_number, j.aggregation_round, j.circuit_id), (10, 1, 3), "batch 10's leaf before batch 13's round 0");

    // Ageing: a point of priority per second waited. Batch 20 (priority 0) waits 2.5 s; then 21
    // (priority 1) and 22 (priority 5) arrive: 22 (5) > 20 (0 + 2) > 21 (1 + 0).
    let mut wg2 = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h", 1, "")).await;
    submit_as(&s.url, 20, version(1, 0), 0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Batch 13 (aged too, submitted earlier) is cleared out of the way first.
    let mut order = vec![];
    submit_as(&s.url, 21, version(1, 0), 1).await.unwrap();
    submit_as(&s.url, 22, version(1, 0), 5).await.unwrap();
    for _ in 0..4 {
        wg2.credit(1);
        order.push(next_batch(&mut wg2).await);
    }
    order.retain(|&b| b != 13);
    assert_eq!(order, [22, 20, 21], "the waiting batch aged past a higher priority");
}

// ------------------------------------------------------------------ setup-data affinity

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn among_equally_urgent_jobs_the_one_whose_setup_is_loaded_on_the_prover_goes_first() {
    for affinity in [true, false] {
        let s = start_scheduler_with(Settings { policy: Policy { setup_affinity: affinity, ..Policy::default() }, ..settings() }).await;
        let loaded = |pairs: &[(u32, u32)]| -> Vec<v1::CircuitPair> {
            pairs.iter().map(|&(aggregation_round, circuit_id)| v1::CircuitPair { aggregation_round, circuit_id }).collect()
        };
        let prover = RawWorker::connect(
            &s.url,
            v1::Register { loaded_setups: loaded(&[(0, 3)]), ..register(Role::Prover, "a", "h", 8, "http://p:1") },
        )
        .await;
        let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h", 1, "")).await;
        wg.credit(1);
        submit_as(&s.url, 1, version(1, 0), 0).await.unwrap();
        next_batch(&mut wg).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut wvg = RawWorker::connect(&s.url, register(Role::Wvg, "a", "h", 8, "")).await;
        wvg.credit(1);
        let first = wvg.lease().await.job.unwrap().circuit_id;
        // The prover loads type 2 (a heartbeat says so): the next lease prefers it.
        prover.heartbeat_with_setups(&loaded(&[(0, 2)]));
        tokio::time::sleep(Duration::from_millis(200)).await;
        wvg.credit(1);
        let second = wvg.lease().await.job.unwrap().circuit_id;
        if affinity {
            assert_eq!((first, second), (3, 2), "the warm circuit type, not the lowest job id");
        } else {
            assert_eq!((first, second), (1, 1), "without affinity: job id order");
        }
    }
}

// ------------------------------------------------------------------ memory budgets

const WEIGHTS: &str = "
[[weight]]
aggregation_round = 0
circuit_id = 1
peak_mib = 600

[[weight]]
aggregation_round = 0
circuit_id = 2
peak_mib = 300

[[weight]]
aggregation_round = 0
circuit_id = 3
peak_mib = 300
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_never_leased_past_its_memory_budget_and_a_heavy_job_is_not_starved_by_light_ones() {
    let policy = Policy { job_weights: JobWeights::parse(WEIGHTS).unwrap(), reserve_after_secs: 1.0, ..Policy::default() };
    let s = start_scheduler_with(Settings { policy, ..settings() }).await;
    let _p = RawWorker::connect(&s.url, register(Role::Prover, "a", "h", 16, "http://p:1")).await;
    let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h", 1, "")).await;
    wg.credit(1);
    submit_as(&s.url, 1, version(1, 0), 0).await.unwrap();
    let l = wg.lease().await;
    // Two heavy jobs (type 1, 600 MiB) and four light ones (types 2 and 3, 300 MiB).
    wg.complete(&l.lease_id, &[(1, 2), (2, 2), (3, 2)]);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut wvg = RawWorker::connect(&s.url, v1::Register { memory_budget_mib: 1000, ..register(Role::Wvg, "a", "h", 8, "") }).await;
    wvg.credit(8);
    // 600 (heavy) + 300 (light) = 900: the second heavy one (1500) and a second light one (1200) do not fit.
    let a = wvg.lease().await;
    let b = wvg.lease().await;
    let pair = |l: &v1::Lease| l.job.as_ref().unwrap().circuit_id;
    assert_eq!((pair(&a), pair(&b)), (1, 2));
    assert!(wvg.next(Duration::from_millis(500)).await.is_none(), "nothing more fits in 1000 MiB");
    let workers = admin(&s.url).await.list_workers(v1::ListWorkersRequest {}).await.unwrap().into_inner().workers;
    let shown = workers.iter().find(|w| w.id == wvg.id).unwrap();
    assert_eq!((shown.memory_budget_mib, shown.memory_used_mib), (1000, 900));

    // The heavy job has now waited past the reserve (1 s): the light job's 300 MiB freed is not
    // backfilled with another light job (it would fit); the heavy one goes once 600 MiB are free.
    tokio::time::sleep(Duration::from_millis(800)).await;
    wvg.complete(&b.lease_id, &[]);
    assert!(wvg.next(Duration::from_millis(500)).await.is_none(), "light jobs held back behind the overdue heavy one");
    wvg.complete(&a.lease_id, &[]);
    let c = wvg.lease().await;
    assert_eq!(pair(&c), 1, "the heavy job, once it fits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_batch_and_no_heavy_job_starves_over_a_long_mixed_run() {
    // A low-priority batch first, then a steady stream of high-priority ones, more than the
    // workers keep up with; heavy and light proving jobs under a memory budget.
    let policy = Policy {
        job_weights: JobWeights::parse(WEIGHTS).unwrap(),
        ageing_secs: 0.25,
        reserve_after_secs: 0.5,
        ..Policy::default()
    };
    let s = start_scheduler_with(Settings { policy, ..settings() }).await;
    let stop = CancellationToken::new();
    let _stop_on_panic = stop.clone().drop_guard();
    let weights = vec![((0, 1), 600), ((0, 2), 300), ((0, 3), 300)];
    let _p = RawWorker::connect(&s.url, register(Role::Prover, "a", "h", 64, "http://p:1")).await;
    let mut wvg = Sim::new(v1::Register { memory_budget_mib: 1000, ..register(Role::Wvg, "a", "h", 4, "") }, 4);
    wvg.weights = weights;
    wvg.hold = Duration::from_millis(40);
    let mut wg = Sim::new(register(Role::WitnessGenerator, "a", "h", 1, ""), 1);
    wg.hold = Duration::from_millis(20);
    let workers = vec![
        wg.spawn(s.url.clone(), stop.clone()),
        wvg.spawn(s.url.clone(), stop.clone()),
        Sim::new(register(Role::Compressor, "a", "h", 1, ""), 1).spawn(s.url.clone(), stop.clone()),
    ];
    submit_as(&s.url, 1, version(1, 0), 0).await.unwrap();
    let mut n = 2;
    let start = tokio::time::Instant::now();
    let mut low_proven_at = None;
    while start.elapsed() < Duration::from_secs(20) {
        submit_as(&s.url, n, version(1, 0), 10).await.unwrap();
        n += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
        if low_proven_at.is_none() && get_batch(&s.url, 1).await.state == v1::BatchState::Proven as i32 {
            low_proven_at = Some(start.elapsed());
            break;
        }
    }
    let proven_at = low_proven_at.expect("the low-priority batch starved behind higher-priority ones");
    let backlog = admin(&s.url).await.get_queue_depth(v1::GetQueueDepthRequest {}).await.unwrap().into_inner();
    let queued: u32 = backlog.depths.iter().filter(|d| d.status == "queued" || d.status == "waiting").map(|d| d.jobs).sum();
    assert!(queued > 0, "the high-priority stream still had work when batch 1 was proven (else nothing was shown)");
    eprintln!("batch 1 (priority 0) proven after {proven_at:?} while {} higher-priority batches arrived", n - 2);
    // Every batch proves once the stream stops.
    until_proven(&s.url, 1..n, Duration::from_secs(60)).await;
    stop.cancel();
    let wvg_leases = workers.into_iter().nth(1).unwrap().await.unwrap();
    assert!(wvg_leases.iter().any(|l| l.job.as_ref().unwrap().circuit_id == 1), "heavy jobs were leased");
}

/// Issue 16 rule 5: a WVG is matched against every free prover it may use (host, then zone)
/// until a queued job fits one. The prover on the WVG's own host cannot take the queued job
/// (`near`: its prover group, or its protocol versions); a prover on another host of the zone
/// can (`far`). Before, the WVG was matched with its host's prover only, and the job waited
/// while the other prover idled. Returns the prover the lease was matched with, and `near`'s id.
async fn matched_prover(near: v1::Register, far: v1::Register, job_version: v1::ProtocolVersion, circuit: u32) -> (String, String, String) {
    let groups = ProverGroups::parse(GROUPS).unwrap();
    let s = start_scheduler_with(Settings { prover_groups: Some(groups), ..settings() }).await;
    register_version(&s.url, version(1, 1)).await;
    let near = RawWorker::connect(&s.url, v1::Register { host: "h1".into(), ..near }).await;
    let far = RawWorker::connect(&s.url, v1::Register { host: "h2".into(), ..far }).await;
    let mut wg = RawWorker::connect(&s.url, register(Role::WitnessGenerator, "a", "h3", 1, "")).await;
    wg.credit(1);
    assert!(submit_as(&s.url, 1, job_version, 0).await.unwrap());
    let l = wg.lease().await;
    wg.complete(&l.lease_id, &[(circuit, 1)]);
    wg.expect_recorded(&l.lease_id).await;
    let mut wvg = RawWorker::connect(&s.url, register(Role::Wvg, "a", "h1", 1, "")).await;
    wvg.credit(1);
    let lease = wvg.lease().await;
    assert_eq!(lease.job.as_ref().map(|j| (j.aggregation_round, j.circuit_id)), Some((0, circuit)));
    (lease.prover_worker_id, near.id.clone(), far.id.clone())
}

/// Batch `n` submitted and its round-0 witness generation done by a witness generator on host
/// `h2` (one basic circuit of type 1): its round-0 proving job is queued.
async fn basic_circuits_queued(url: &str, n: u32) {
    let mut wg = RawWorker::connect(url, register(Role::WitnessGenerator, "a", "h2", 1, "")).await;
    wg.credit(1);
    assert!(submit(url, n).await);
    let l = wg.lease().await;
    wg.complete(&l.lease_id, &[(1, 1)]);
    wg.expect_recorded(&l.lease_id).await;
}

/// Issue 16 rule 6: prover slots are what the provers say. A prover whose heartbeat says its one
/// slot is proving (a witness vector whose lease the scheduler no longer counts: its WVG failed
/// it after the push, or it was matched before a restart) is matched with no WVG; once a
/// heartbeat says the slot is free, the queued job is leased at once, matched with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prover_that_says_its_slots_are_busy_is_matched_with_no_wvg_until_one_is_free() {
    let s = start_scheduler_with(settings()).await;
    let prover = RawWorker::connect(&s.url, register(Role::Prover, "a", "h1", 1, "http://prover:1")).await;
    prover.heartbeat_busy(1);
    basic_circuits_queued(&s.url, 1).await;
    let mut wvg = RawWorker::connect(&s.url, register(Role::Wvg, "a", "h1", 1, "")).await;
    wvg.credit(1);
    assert!(wvg.next(Duration::from_millis(700)).await.is_none(), "matched with a prover whose every slot is busy");
    prover.heartbeat_busy(0);
    let lease = wvg.lease().await;
    assert_eq!(lease.prover_worker_id, prover.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_never_waits_while_a_prover_of_its_group_is_free() {
    let prover = |endpoint: &str, group| v1::Register { prover_group: Some(group), ..register(Role::Prover, "a", "", 4, endpoint) };
    // Round 0 has one circuit of type 2: group 2's pair, not group 1's.
    let (matched, near, far) = matched_prover(prover("http://near:1", 1), prover("http://far:1", 2), version(1, 0), 2).await;
    assert_eq!(matched, far, "matched with the one prover whose group takes pair 0/2");
    // And the near prover still comes first when it can take the job.
    let (matched, near2, _) = matched_prover(prover("http://near:1", 1), prover("http://far:1", 2), version(1, 0), 1).await;
    assert_eq!(matched, near2, "the same host first");
    assert_ne!(near, far);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_never_waits_while_a_prover_of_its_version_is_free() {
    let prover = |endpoint: &str, v| v1::Register { protocol_versions: vec![v], ..register(Role::Prover, "a", "", 4, endpoint) };
    let (matched, _, far) = matched_prover(prover("http://near:1", version(1, 0)), prover("http://far:1", version(1, 1)), version(1, 1), 1).await;
    assert_eq!(matched, far, "matched with the one prover that proves 0.1.1");
}

/// Issue 16 rule 6: a `Failed` for a WVG lease is taken only from the connection holding it, or
/// from the prover it was matched with. A WVG whose receipt was lost after the hand-off (its
/// prover took the lease over and is proving) reports the push failed: refused, the job stays
/// leased to the prover, no attempt spent; the prover's own failure is taken. Before, the WVG's
/// late failure requeued the job under the prover and spent an attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wvg_cannot_fail_a_lease_its_prover_took_over() {
    let s = start_scheduler_with(settings()).await;
    let mut prover = RawWorker::connect(&s.url, register(Role::Prover, "a", "h1", 1, "http://prover:1")).await;
    basic_circuits_queued(&s.url, 1).await;
    let mut wvg = RawWorker::connect(&s.url, register(Role::Wvg, "a", "h1", 1, "")).await;
    wvg.credit(1);
    let lease = wvg.lease().await;
    assert_eq!(lease.prover_worker_id, prover.id);
    let holder = || async {
        sqlx::query_scalar::<_, Option<String>>("SELECT leased_to FROM jobs WHERE lease_id = $1::uuid")
            .bind(&lease.lease_id)
            .fetch_one(&s.shared.pool)
            .await
            .unwrap()
    };
    // The prover has the whole witness vector and takes the lease over with its heartbeat.
    prover.heartbeat(&[&lease.lease_id]);
    let until = Instant::now() + Duration::from_secs(5);
    while holder().await.as_deref() != Some(prover.id.as_str()) {
        assert!(Instant::now() < until, "the prover never took the lease over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The WVG never saw the receipt: it reports the push failed.
    wvg.fail(&lease.lease_id, true);
    match wvg.next_any(Duration::from_secs(5)).await {
        Some(v1::scheduler_message::Msg::Refused(r)) => assert!(r.reason.contains("held by another connection"), "{}", r.reason),
        other => panic!("expected Refused, got {other:?}"),
    }
    assert_eq!(holder().await.as_deref(), Some(prover.id.as_str()), "still the prover's");
    // The prover's own failure is taken: the job goes back to the queue.
    prover.fail(&lease.lease_id, true);
    prover.expect_recorded(&lease.lease_id).await;
    let (status, attempts): (String, i32) = sqlx::query_as("SELECT status, attempts FROM jobs WHERE kind = 'proving' AND batch_number = 1")
        .fetch_one(&s.shared.pool)
        .await
        .unwrap();
    assert_eq!((status.as_str(), attempts), ("queued", 1));

    // A failure resent on a new stream after a reconnect (the old stream gone, so no live
    // connection holds the lease) is taken.
    wvg.credit(1);
    let again = wvg.lease().await;
    let gone = wvg.id.clone();
    drop(wvg);
    let until = Instant::now() + Duration::from_secs(5);
    while s.shared.registry().get(&gone).is_some() {
        assert!(Instant::now() < until, "the closed stream never left the registry");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut back = RawWorker::connect(&s.url, register(Role::Wvg, "a", "h1", 1, "")).await;
    back.fail(&again.lease_id, true);
    back.expect_recorded(&again.lease_id).await;
}
