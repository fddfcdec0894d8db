//! The gateway's JSON under attack (property-based, proptest), through the real binary: the
//! gateway is a binary crate, so its `l2_api` types are reached the way the L2 node reaches them,
//! over HTTP. Arbitrary bytes, arbitrary strings, arbitrary JSON built from the API's own keys,
//! and mutations of valid bodies (bytes overwritten, inserted, cut; or each field, the batch
//! file's bytes included, changed within the shape) are each answered as
//! `docs/gateway-api.md` says, never with a dropped connection (a handler that panicked):
//!
//! - server mode, `POST /submit_request_for_proofs`: 400 with `{"error": ...}` naming what is
//!   wrong, unless the body is a `ProofGenerationData` whose file decodes and agrees with it;
//!   then it reaches the scheduler (here a fake that refuses every batch: 422), or the store
//!   refuses its number for holding other bytes (409);
//! - server mode, `POST /poll_generated_proofs`: 400, or 404 for a well-formed poll (nothing
//!   was pushed to that gateway);
//! - client mode, the node's answer to `POST /proof_generation_data`: skipped (polled again)
//!   unless it is a `ProofGenerationDataResponse` with `data`; then the batch is posted back to
//!   the node as `rejected` with the reason.
//!
//! What the gateway must accept is decided here by serde with the documented shapes (the structs
//! below): a change of the gateway's parsing that the document does not make fails these tests.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::routing::post as route_post;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use proofmesh_core::batch::{Account, Batch, StorageAccess, Transaction};
use proofmesh_core::{BatchNumber, ProtocolVersion};
use proofmesh_proto::v1::batches_server::{Batches, BatchesServer};
use proofmesh_proto::v1::{
    BatchStatus, GetProofRequest, GetProofResponse, SubmitBatchRequest, SubmitBatchResponse, WatchBatchRequest,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde::Deserialize;
use serde_json::{json, Value};
use tonic::{Request, Response, Status};

/// `docs/gateway-api.md`'s ProofGenerationData.
#[derive(Deserialize)]
struct ProofGenerationData {
    batch_number: u32,
    protocol_version: String,
    batch_file: String,
}

/// The node's answer to `/proof_generation_data`: `{"data": ProofGenerationData | null}`.
#[derive(Deserialize)]
struct ProofGenerationDataResponse {
    data: Option<ProofGenerationData>,
}

/// The body of `/poll_generated_proofs`.
#[derive(Deserialize)]
#[allow(dead_code)]
struct PollRequest {
    batch_number: u32,
}

const MAX_BODY_BYTES: usize = 1 << 16;

fn cases(n: u32) -> TestRunner {
    TestRunner::new(Config { cases: n, failure_persistence: None, ..Config::default() })
}

/// Runs the tests' fakes (scheduler, node) and their HTTP client.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap())
}

fn http() -> &'static reqwest::Client {
    static HTTP: OnceLock<reqwest::Client> = OnceLock::new();
    HTTP.get_or_init(|| reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap())
}

/// A scheduler that has registered no protocol version: every `SubmitBatch` is refused.
struct RefusingScheduler;

#[tonic::async_trait]
impl Batches for RefusingScheduler {
    async fn submit_batch(
        &self,
        request: Request<SubmitBatchRequest>,
    ) -> Result<Response<SubmitBatchResponse>, Status> {
        let number = request.into_inner().batch_number;
        Err(Status::failed_precondition(format!("batch {number}: no protocol version is registered")))
    }

    type WatchBatchStream = tokio_stream::Empty<Result<BatchStatus, Status>>;

    async fn watch_batch(&self, _: Request<WatchBatchRequest>) -> Result<Response<Self::WatchBatchStream>, Status> {
        Err(Status::not_found("no batches here"))
    }

    async fn get_proof(&self, _: Request<GetProofRequest>) -> Result<Response<GetProofResponse>, Status> {
        Err(Status::not_found("no batches here"))
    }
}

/// The refusing scheduler on a free port; its URL.
fn refusing_scheduler() -> String {
    runtime().block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(BatchesServer::new(RefusingScheduler))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        url
    })
}

/// A running `proofmesh-gateway` with its artifact store and log in a temporary directory;
/// killed when dropped.
struct Gateway {
    child: Mutex<Child>,
    dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts the gateway on the refusing scheduler, with `args` (the mode's flags).
    fn start(args: &[&str]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_proofmesh-gateway"));
        for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("PROOFMESH_")) {
            command.env_remove(name);
        }
        let child = command
            .args(["--scheduler", &refusing_scheduler(), "--max-body-bytes", &MAX_BODY_BYTES.to_string()])
            .arg("--artifacts")
            .arg(dir.path().join("data"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Gateway { child: Mutex::new(child), dir }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("gateway.log")
    }

    /// Its log so far.
    fn log(&self) -> String {
        let mut text = String::new();
        std::fs::File::open(self.log_path()).unwrap().read_to_string(&mut text).unwrap();
        text
    }

    /// Fails (with the log) if the gateway exited or logged a panic.
    fn assert_alive(&self) {
        let exited = self.child.lock().unwrap().try_wait().unwrap();
        let log = self.log();
        assert!(exited.is_none() && !log.contains("panicked"), "gateway exited ({exited:?}) or panicked:\n{log}");
    }

    /// `Err` with the log's tail, for a failed property.
    fn explain(&self, e: impl std::fmt::Display) -> String {
        let log = self.log();
        format!("{e}\n--- gateway log (tail) ---\n{}", &log[log.len().saturating_sub(4000)..])
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Blocks until `ready` or 30 s (then fails with the gateway's log).
fn wait_for(gw: &Gateway, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        gw.assert_alive();
        assert!(Instant::now() < deadline, "{}", gw.explain(format!("timed out waiting for {what}")));
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A server-mode gateway and its base URL, once it answers.
fn server() -> (Gateway, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let gw = Gateway::start(&["--mode", "server", "--listen", &listen]);
    let url = format!("http://{listen}");
    wait_for(&gw, "the gateway to listen", || post_raw(&url, "/poll_generated_proofs", b"{}".to_vec()).is_ok());
    (gw, url)
}

fn post_raw(url: &str, path: &str, body: Vec<u8>) -> Result<(u16, Vec<u8>), reqwest::Error> {
    runtime().block_on(async {
        let response =
            http().post(format!("{url}{path}")).header("content-type", "application/json").body(body).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.bytes().await?.to_vec()))
    })
}

/// Posts `body`; the answer's status and its `error`. Every answer must arrive (a panicking
/// handler drops the connection) and every refusal must be `{"error": "<non-empty>"}`.
fn post(url: &str, path: &str, body: Vec<u8>) -> Result<(u16, String), TestCaseError> {
    let (status, answer) = post_raw(url, path, body).map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
    if status < 400 {
        return Ok((status, String::new()));
    }
    let error: Value = serde_json::from_slice(&answer)
        .map_err(|e| TestCaseError::fail(format!("{status} with a body that is not JSON ({e}): {answer:?}")))?;
    let reason = error["error"].as_str().unwrap_or_default().to_string();
    prop_assert!(!reason.is_empty(), "{} without an error: {}", status, error);
    Ok((status, reason))
}

/// A valid one-transaction batch file `number` at protocol version 0.1.0.
fn batch_file(number: u32) -> Vec<u8> {
    let access = |key| StorageAccess {
        key,
        old: Account { balance: 10, nonce: 0 },
        new: Account { balance: 10, nonce: 0 },
        siblings: vec![[0; 4]; 4],
    };
    Batch {
        number: BatchNumber(number),
        protocol_version: ProtocolVersion { minor: 1, patch: 0 },
        state_tree_depth: 4,
        prev_state_root: [1, 2, 3, 4],
        transactions: vec![Transaction { from: 1, to: 2, amount: 0, nonce: 0 }],
        storage_accesses: vec![access(1), access(2)],
    }
    .to_bytes()
}

/// A valid ProofGenerationData of batch 7, as JSON.
fn valid_data() -> Value {
    json!({"batch_number": 7, "protocol_version": "0.1.0", "batch_file": STANDARD.encode(batch_file(7))})
}

/// How the gateway must take a pushed body: `Ok((number, batch file))` when it decodes (it then
/// reaches the store and the scheduler), else the start of the 400's reason.
fn expected_push(body: &[u8]) -> Result<(u32, Vec<u8>), &'static str> {
    let data: ProofGenerationData = serde_json::from_slice(body).map_err(|_| "the body is not the JSON expected")?;
    decodes(&data)
}

/// `ProofGenerationData::decode`'s checks, in its order, as the API document states them.
fn decodes(data: &ProofGenerationData) -> Result<(u32, Vec<u8>), &'static str> {
    let bytes = STANDARD.decode(data.batch_file.as_bytes()).map_err(|_| "batch_file is not valid base64")?;
    let version: ProtocolVersion = data.protocol_version.parse().map_err(|_| "protocol version ")?;
    let batch = Batch::from_bytes(&bytes).map_err(|_| "batch_file is not a batch")?;
    if batch.number.0 != data.batch_number {
        return Err("batch_number is ");
    }
    if batch.protocol_version != version {
        return Err("protocol_version is ");
    }
    Ok((data.batch_number, bytes))
}

/// `bytes` with each `(position, value)` written and each `(position, bytes)` inserted
/// (positions modulo the length), cut to `keep` bytes (modulo length + 1) if given.
fn mutate(mut bytes: Vec<u8>, writes: &[(usize, u8)], inserts: &[(usize, Vec<u8>)], keep: Option<usize>) -> Vec<u8> {
    for &(at, v) in writes {
        if !bytes.is_empty() {
            let n = bytes.len();
            bytes[at % n] = v;
        }
    }
    for (at, insert) in inserts {
        let at = at % (bytes.len() + 1);
        bytes.splice(at..at, insert.iter().copied());
    }
    if let Some(keep) = keep {
        bytes.truncate(keep % (bytes.len() + 1));
    }
    bytes
}

/// Mutations of `valid`: positions near its start or end (where the JSON's keys and punctuation
/// are, around a long base64 string) as often as anywhere.
fn mutated(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let n = valid.len();
    let position = prop_oneof![0..64usize, (n.saturating_sub(64)..n + 1), any::<usize>()];
    let byte = prop_oneof![any::<u8>(), proptest::sample::select(b"{}[]\",:0123456789 nul\\eE-.A=".to_vec())];
    (
        vec((position.clone(), byte), 0..4),
        vec((position, vec(any::<u8>(), 1..6)), 0..2),
        proptest::option::weighted(0.2, any::<usize>()),
    )
        .prop_map(move |(writes, inserts, keep)| mutate(valid.clone(), &writes, &inserts, keep))
}

/// ProofGenerationData-shaped JSON whose fields are each valid or nearly: batch 7's file with
/// bytes overwritten or cut (so its number, version or contents change, or it stops parsing),
/// at times not quite base64; the number 7 or another; the version right, of another form, or
/// wrong.
fn nearly_valid_data() -> impl Strategy<Value = Value> {
    let file = (vec((any::<usize>(), any::<u8>()), 0..3), proptest::option::weighted(0.1, any::<usize>()))
        .prop_map(|(writes, keep)| mutate(batch_file(7), &writes, &[], keep));
    let base64 = (file, prop_oneof![8 => Just(""), 1 => Just("%"), 1 => Just("==")], any::<usize>()).prop_map(
        |(bytes, insert, at)| {
            let mut text = STANDARD.encode(bytes);
            let at = at % (text.len() + 1);
            text.insert_str(at, insert);
            text
        },
    );
    let number = prop_oneof![3 => Just(7u32), 1 => any::<u32>()];
    let version = prop_oneof![
        3 => Just("0.1.0".to_string()),
        1 => Just("1.0".to_string()),
        1 => Just("0.2.0".to_string()),
        1 => Just("0.1".to_string()),
        1 => ".{0,8}",
    ];
    (number, version, base64).prop_map(|(batch_number, protocol_version, batch_file)| {
        json!({"batch_number": batch_number, "protocol_version": protocol_version, "batch_file": batch_file})
    })
}

/// Arbitrary JSON built from the API's keys and values close to valid ones (and some far).
fn json_value() -> impl Strategy<Value = Value> {
    let file = STANDARD.encode(batch_file(7));
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        prop_oneof![Just(7i64), Just(-1), Just(u32::MAX as i64), Just(u32::MAX as i64 + 1), any::<i64>()]
            .prop_map(Value::from),
        prop_oneof![Just(7.0f64), Just(0.5), Just(1e300)].prop_map(Value::from),
        prop_oneof![
            Just("0.1.0".to_string()),
            Just("0.1.0.0".to_string()),
            Just("0.65536.0".to_string()),
            Just(file),
            Just("%%%".to_string()),
            Just("UE1CVA==".to_string()),
            ".{0,12}",
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        let key =
            proptest::sample::select(vec!["batch_number", "protocol_version", "batch_file", "data", "error", "x"]);
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::from),
            vec((key, inner), 0..5)
                .prop_map(|fields| Value::Object(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

/// Bodies that are rarely anything: bytes, text, JSON of the API's words.
fn arbitrary_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..512),
        any::<String>().prop_map(String::into_bytes),
        json_value().prop_map(|v| v.to_string().into_bytes()),
    ]
}

/// Pushes `body` and checks the answer against [`expected_push`]; `stored` is what the gateway's
/// store holds by batch number (a number stored with other bytes is refused, 409).
fn check_push(url: &str, body: Vec<u8>, stored: &Mutex<HashMap<u32, Vec<u8>>>) -> Result<(), TestCaseError> {
    let expected = expected_push(&body);
    let (status, reason) = post(url, "/submit_request_for_proofs", body)?;
    match expected {
        Err(starts) => {
            prop_assert_eq!(status, 400, "{}", reason);
            prop_assert!(reason.starts_with(starts), "{:?} does not start with {:?}", reason, starts);
        }
        Ok((number, bytes)) => {
            let mut stored = stored.lock().unwrap();
            let earlier = stored.entry(number).or_insert_with(|| bytes.clone());
            if *earlier == bytes {
                prop_assert_eq!(status, 422, "{}", reason);
                prop_assert!(reason.contains("no protocol version is registered"), "{}", reason);
            } else {
                prop_assert_eq!(status, 409, "{}", reason);
            }
        }
    }
    Ok(())
}

#[test]
fn server_mode_answers_arbitrary_pushes_with_400_never_a_panic() {
    let (gw, url) = server();
    let stored = Mutex::new(HashMap::new());
    let result = cases(256).run(&arbitrary_body(), |body| check_push(&url, body, &stored));
    result.unwrap_or_else(|e| panic!("{}", gw.explain(e)));
    gw.assert_alive();
}

#[test]
fn server_mode_answers_mutated_pushes_as_their_shape_says_never_a_panic() {
    let (gw, url) = server();
    let stored = Mutex::new(HashMap::new());
    // The valid body itself reaches the scheduler (and its refusal is a 422).
    check_push(&url, valid_data().to_string().into_bytes(), &stored).unwrap();
    let bodies = prop_oneof![
        mutated(valid_data().to_string().into_bytes()),
        nearly_valid_data().prop_map(|data| data.to_string().into_bytes()),
    ];
    let result = cases(256).run(&bodies, |body| check_push(&url, body, &stored));
    result.unwrap_or_else(|e| panic!("{}", gw.explain(e)));
    gw.assert_alive();
}

#[test]
fn server_mode_answers_arbitrary_and_mutated_polls_with_400_or_404_never_a_panic() {
    let (gw, url) = server();
    let bodies = prop_oneof![arbitrary_body(), mutated(br#"{"batch_number": 7}"#.to_vec())];
    let result = cases(256).run(&bodies, |body| {
        let well_formed = serde_json::from_slice::<PollRequest>(&body).is_ok();
        let (status, reason) = post(&url, "/poll_generated_proofs", body)?;
        if well_formed {
            prop_assert_eq!(status, 404, "{}", reason);
            prop_assert!(reason.contains("is unknown"), "{}", reason);
        } else {
            prop_assert_eq!(status, 400, "{}", reason);
            prop_assert!(reason.starts_with("the body is not the JSON expected"), "{}", reason);
        }
        Ok(())
    });
    result.unwrap_or_else(|e| panic!("{}", gw.explain(e)));
    gw.assert_alive();
}

/// The node's side in client mode: answers to `/proof_generation_data` from a queue
/// (`{"data": null}` when it is empty), and the results posted back.
#[derive(Default)]
struct Node {
    answers: VecDeque<Vec<u8>>,
    polls: usize,
    /// The poll that took the last answer from the queue.
    answered_at_poll: usize,
    /// `(number in the path, body)` of each `/submit_proof/{number}`.
    posts: Vec<(u32, Value)>,
}

type SharedNode = Arc<Mutex<Node>>;

async fn node_answer(State(node): State<SharedNode>) -> Vec<u8> {
    let mut node = node.lock().unwrap();
    node.polls += 1;
    match node.answers.pop_front() {
        Some(answer) => {
            node.answered_at_poll = node.polls;
            answer
        }
        None => br#"{"data": null}"#.to_vec(),
    }
}

async fn node_take_result(State(node): State<SharedNode>, Path(number): Path<u32>, body: axum::body::Bytes) {
    let body = serde_json::from_slice(&body).unwrap_or_else(|e| json!({"unparsable": e.to_string()}));
    node.lock().unwrap().posts.push((number, body));
}

/// Feeds the node's answer `body` to a client-mode gateway and checks what it did with it.
fn check_answer(gw: &Gateway, node: &SharedNode, body: Vec<u8>) -> Result<(), TestCaseError> {
    let expected = serde_json::from_slice::<ProofGenerationDataResponse>(&body).ok().and_then(|r| r.data);
    let posts_before = node.lock().unwrap().posts.len();
    node.lock().unwrap().answers.push_back(body);
    // The poll loop handles an answer (submitting its batch, if any) before it polls again.
    wait_for(gw, "the next poll", || {
        let node = node.lock().unwrap();
        node.answers.is_empty() && node.polls > node.answered_at_poll
    });
    let Some(data) = expected else { return Ok(()) };
    // A batch the gateway could not take is posted back to the node as rejected (from a task).
    wait_for(gw, "the rejected batch to be posted back", || node.lock().unwrap().posts.len() > posts_before);
    let node = node.lock().unwrap();
    prop_assert_eq!(node.posts.len(), posts_before + 1, "{:?}", &node.posts[posts_before..]);
    let (number, result) = &node.posts[posts_before];
    prop_assert_eq!(*number, data.batch_number);
    prop_assert_eq!(&result["batch_number"], &json!(data.batch_number));
    prop_assert_eq!(&result["protocol_version"], &json!(data.protocol_version));
    prop_assert_eq!(&result["status"], "rejected");
    let reason = result["error"].as_str().unwrap_or_default();
    match decodes(&data) {
        Err(starts) => prop_assert!(reason.starts_with(starts), "{:?} does not start with {:?}", reason, starts),
        // The store (409's reason) or the scheduler refused it.
        Ok(_) => prop_assert!(
            reason.contains("no protocol version is registered") || reason.contains("with other contents"),
            "{}",
            reason
        ),
    }
    Ok(())
}

#[test]
fn client_mode_skips_or_rejects_arbitrary_and_mutated_node_answers_never_a_panic() {
    let node = SharedNode::default();
    let node_url = runtime().block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/proof_generation_data", route_post(node_answer))
            .route("/submit_proof/{number}", route_post(node_take_result))
            .with_state(node.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    });
    let gw = Gateway::start(&["--mode", "client", "--l2-node-url", &node_url, "--poll-interval-ms", "1"]);
    wait_for(&gw, "the first poll", || node.lock().unwrap().polls > 0);

    let valid = json!({"data": valid_data()}).to_string().into_bytes();
    let answers = prop_oneof![
        arbitrary_body(),
        mutated(valid),
        nearly_valid_data().prop_map(|data| json!({"data": data}).to_string().into_bytes()),
    ];
    let result = cases(256).run(&answers, |body| check_answer(&gw, &node, body));
    result.unwrap_or_else(|e| panic!("{}", gw.explain(e)));
    // Nothing posted late for an answer that should have been skipped.
    let posted = node.lock().unwrap().posts.len();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(node.lock().unwrap().posts.len(), posted);
    gw.assert_alive();
}
