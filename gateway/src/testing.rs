//! Test fixtures: a small valid batch file, and a `Batches` service on a real TCP port that plays
//! the scheduler's side of the protocol from a script, so that the gateway's submit, watch and
//! fetch path runs over real gRPC.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use proofmesh_core::batch::{Account, Batch, StorageAccess, Transaction};
use proofmesh_core::{BatchNumber, ProtocolVersion};
use proofmesh_proto::v1::batches_server::{Batches, BatchesServer};
use proofmesh_proto::v1::{
    BatchState, BatchStatus, GetProofRequest, GetProofResponse, RoundProgress, SubmitBatchRequest, SubmitBatchResponse,
    WatchBatchRequest,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// The bytes of a valid one-transaction batch `number` at protocol version 0.1.0.
pub(crate) fn sample_batch(number: u32) -> Vec<u8> {
    sample_batch_with(number, ProtocolVersion { minor: 1, patch: 0 }, [1, 2, 3, 4])
}

/// The bytes of a valid one-transaction batch `number` at `version`, starting from
/// `prev_state_root` (another root: the same number with other contents).
pub(crate) fn sample_batch_with(number: u32, version: ProtocolVersion, prev_state_root: [u64; 4]) -> Vec<u8> {
    let depth = 4;
    let access = |key| StorageAccess {
        key,
        old: Account { balance: 10, nonce: 0 },
        new: Account { balance: 10, nonce: 0 },
        siblings: vec![[0; 4]; usize::from(depth)],
    };
    Batch {
        number: BatchNumber(number),
        protocol_version: version,
        state_tree_depth: depth,
        prev_state_root,
        transactions: vec![Transaction { from: 1, to: 2, amount: 0, nonce: 0 }],
        storage_accesses: vec![access(1), access(2)],
    }
    .to_bytes()
}

/// What the fake answers for one batch number.
#[derive(Debug, Clone)]
pub(crate) struct Script {
    /// One entry per `WatchBatch` call, in order (the last one repeats): the statuses it
    /// streams, then the stream ends.
    pub watches: Vec<Vec<BatchStatus>>,
    /// `GetProof`'s bytes.
    pub proof: Vec<u8>,
}

/// The fake's record of what it was asked.
#[derive(Debug, Default)]
pub(crate) struct Calls {
    /// Every `SubmitBatch` request.
    pub submits: Vec<SubmitBatchRequest>,
    /// `WatchBatch` calls per batch number.
    pub watches: HashMap<u32, usize>,
}

#[derive(Debug)]
struct Fake {
    scripts: HashMap<u32, Script>,
    calls: Arc<Mutex<Calls>>,
}

#[tonic::async_trait]
impl Batches for Fake {
    async fn submit_batch(
        &self,
        request: Request<SubmitBatchRequest>,
    ) -> Result<Response<SubmitBatchResponse>, Status> {
        let request = request.into_inner();
        // Like the scheduler: only registered versions (here 0.1.0) take new batches.
        let version = request.protocol_version.and_then(|v| v.to_core());
        if version != Some(ProtocolVersion { minor: 1, patch: 0 }) {
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not registered (register it with Admin.RegisterProtocolVersion)",
                version.map_or("?".into(), |v| v.to_string())
            )));
        }
        let mut calls = self.calls.lock().unwrap();
        // Like the scheduler: the contents' hash recorded first wins.
        let first = calls.submits.iter().find(|s| s.batch_number == request.batch_number);
        if let Some(first) = first.filter(|f| !f.content_sha256.is_empty() && f.content_sha256 != request.content_sha256) {
            return Err(Status::already_exists(format!("batch {} was submitted before with other contents", first.batch_number)));
        }
        let created = first.is_none();
        calls.submits.push(request);
        Ok(Response::new(SubmitBatchResponse { created }))
    }

    type WatchBatchStream = tokio_stream::Iter<std::vec::IntoIter<Result<BatchStatus, Status>>>;

    async fn watch_batch(
        &self,
        request: Request<WatchBatchRequest>,
    ) -> Result<Response<Self::WatchBatchStream>, Status> {
        let number = request.into_inner().batch_number;
        let script = self.scripts.get(&number).ok_or_else(|| Status::not_found(format!("no batch {number}")))?;
        let mut calls = self.calls.lock().unwrap();
        let n = calls.watches.entry(number).or_default();
        let statuses = script.watches[(*n).min(script.watches.len() - 1)].clone();
        *n += 1;
        Ok(Response::new(tokio_stream::iter(statuses.into_iter().map(Ok).collect::<Vec<_>>())))
    }

    async fn get_proof(&self, request: Request<GetProofRequest>) -> Result<Response<GetProofResponse>, Status> {
        let number = request.into_inner().batch_number;
        let script = self.scripts.get(&number).ok_or_else(|| Status::not_found(format!("no batch {number}")))?;
        Ok(Response::new(GetProofResponse { proof_key: String::new(), proof: script.proof.clone() }))
    }
}

/// Serves the scripts on `127.0.0.1:<free port>` until the test's runtime ends; returns the URL
/// and the record of calls.
pub(crate) async fn serve(scripts: HashMap<u32, Script>) -> (String, Arc<Mutex<Calls>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let calls = Arc::new(Mutex::new(Calls::default()));
    let fake = Fake { scripts, calls: calls.clone() };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(BatchesServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (url, calls)
}

/// A status of batch `number` in `state`, with one round per entry of `rounds`
/// (`(round, name, total, succeeded)`).
pub(crate) fn status(number: u32, state: BatchState, rounds: &[(u32, &str, u32, u32)]) -> BatchStatus {
    BatchStatus {
        batch_number: number,
        state: state.into(),
        rounds: rounds
            .iter()
            .map(|&(round, name, total, succeeded)| RoundProgress {
                aggregation_round: round,
                name: name.into(),
                total,
                succeeded,
                ..Default::default()
            })
            .collect(),
        created_unix_ms: 1_000_000,
        finished_unix_ms: if state == BatchState::Proving { 0 } else { 1_012_500 },
        compute_secs: 30.1234,
        ..Default::default()
    }
}

/// A gateway (the shared path) on a fake scheduler playing `scripts`, with its artifact store in
/// a temporary directory. Keep the directory alive for the test.
pub(crate) async fn gateway(
    scripts: HashMap<u32, Script>,
) -> (tempfile::TempDir, crate::watch::Gateway, Arc<Mutex<Calls>>) {
    let dir = tempfile::tempdir().unwrap();
    let (url, calls) = serve(scripts).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let client = crate::scheduler::connect(&url, &Default::default(), &shutdown).await.unwrap().unwrap();
    let gw = crate::watch::Gateway {
        client,
        store: Arc::new(proofmesh_core::LocalStore::new(dir.path().join("data"))),
        progress: crate::progress::Progress::off(),
        shutdown,
    };
    (dir, gw, calls)
}

/// A script that streams one proven status and serves `proof`.
pub(crate) fn proven(number: u32, proof: &[u8]) -> Script {
    let done = [(0, "basic", 1, 1), (1, "leaf", 1, 1), (2, "node", 1, 1), (3, "recursion_tip", 1, 1), (4, "scheduler", 1, 1), (5, "compression", 1, 1)];
    Script {
        watches: vec![vec![status(number, BatchState::Proving, &[(0, "basic", 1, 0)]), status(number, BatchState::Proven, &done)]],
        proof: proof.to_vec(),
    }
}

/// The L2 node simulator, `python3 scripts/l2-node-sim.py ARGS...`, output piped, killed when
/// dropped.
pub(crate) fn node_sim(args: &[&str]) -> tokio::process::Command {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/l2-node-sim.py");
    let mut command = tokio::process::Command::new("python3");
    command
        .arg(script)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}

/// How many `SubmitBatch` calls the fake had for batch `number`.
pub(crate) fn submits_of(calls: &Mutex<Calls>, number: u32) -> usize {
    calls.lock().unwrap().submits.iter().filter(|s| s.batch_number == number).count()
}
