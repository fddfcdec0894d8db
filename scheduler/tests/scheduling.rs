//! Scheduling policy against a real PostgreSQL over real gRPC (docs/scheduling.md): prover groups.

mod common;

use std::time::Duration;

use common::*;
use proofmesh_proto::v1::{self, scheduler_client::SchedulerClient, worker_message, Role};
use proofmesh_scheduler::{ProverGroups, Settings};
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
    };
    let stop = CancellationToken::new();
    let (client, mut leases) = LeaseClient::start(reg, stop.clone());
    tokio::time::timeout(Duration::from_secs(10), client.refused().cancelled()).await.expect("refused at once, not retried");
    let reason = client.refusal().unwrap();
    assert!(reason.contains("prover group 3") && reason.contains("no --prover-groups file"), "{reason}");
    assert!(leases.recv().await.is_none(), "the lease stream ends");
    stop.cancel();
}
