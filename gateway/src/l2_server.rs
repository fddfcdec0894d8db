//! `--mode server`: the gateway listens and the L2 node pushes batches
//! (`POST /submit_request_for_proofs`) and polls for their proofs (`POST /poll_generated_proofs`).
//! Shapes in `l2_api.rs` and `docs/gateway-api.md`.
//!
//! A push is answered once the batch is stored and the scheduler has it (the shared path's
//! [`watch::submit`]), so a 2xx means the batch will be proven whatever happens to the gateway
//! next. Each accepted batch then gets a task that follows it ([`watch::follow`]) and files its
//! result here, in memory, for the polls.
//!
//! Nothing is lost on a gateway restart: a poll for a batch this process does not know reads
//! the batch from the artifact store and takes it along the same path again (`SubmitBatch` is
//! idempotent, so a batch already proven is fetched, not proven twice). Results are held until
//! the gateway stops (a proof is some 50 KB).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use proofmesh_core::{keys, ArtifactError, BatchNumber};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;

use crate::l2_api::{
    self,
    paths, ApiError, PollRequest, ProofGenerationData, ProofResult, ProofStatus, SubmitResponse, Submitted,
};
use crate::watch::{self, Gateway, ParsedBatch};

/// How long a push may wait for the scheduler to take the batch (it retries while the scheduler
/// is away) before the node is answered 503 and asked to push again.
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds `listen` and serves the API until shutdown. Errors: the address cannot be bound.
pub(crate) async fn run(gw: Gateway, listen: SocketAddr, max_body_bytes: usize) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    serve(gw, listener, max_body_bytes).await
}

/// Serves the API on `listener` until `gw.shutdown` is cancelled; requests in progress are
/// finished first. Bodies over `max_body_bytes` are refused with 413.
pub(crate) async fn serve(gw: Gateway, listener: TcpListener, max_body_bytes: usize) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("the listener has no address")?;
    let shutdown = gw.shutdown.clone();
    let app = Arc::new(App { gw, max_body_bytes, results: Mutex::new(HashMap::new()) });
    let router = Router::new()
        .route(paths::SUBMIT_REQUEST_FOR_PROOFS, post(submit_request))
        .route(paths::POLL_GENERATED_PROOFS, post(poll))
        .fallback(|| async { ApiError { status: StatusCode::NOT_FOUND, reason: "no such endpoint".into() } })
        .method_not_allowed_fallback(|| async {
            ApiError { status: StatusCode::METHOD_NOT_ALLOWED, reason: "use POST".into() }
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(app);
    tracing::info!("serving the L2 proof data API on http://{addr}");
    axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await.context("serving HTTP")
}

/// The server's state: the shared path, and every batch's result so far.
#[derive(Debug)]
struct App {
    gw: Gateway,
    max_body_bytes: usize,
    /// By batch number: `proving` until its task files `proven` or `failed`.
    results: Mutex<HashMap<u32, ProofResult>>,
}

impl App {
    /// The result filed for `number`, if this process knows the batch.
    fn result(&self, number: u32) -> Option<ProofResult> {
        self.results.lock().expect("never poisoned: no panics under the lock").get(&number).cloned()
    }

    /// Starts following a batch the scheduler has, unless it is already followed (or ended and
    /// the scheduler did not start it again). True if a task was started.
    fn begin(self: &Arc<Self>, batch: &ParsedBatch, created: bool) -> bool {
        let number = batch.number.0;
        {
            let mut results = self.results.lock().expect("never poisoned");
            match results.get(&number) {
                None => {}
                // A scheduler that created it anew lost its earlier run (a new database).
                Some(r) if created && r.status != ProofStatus::Proving => {}
                Some(_) => return false,
            }
            let version = batch.protocol_version.to_string();
            results.insert(number, ProofResult::without_proof(number, version, ProofStatus::Proving, None));
        }
        // The task needs what the summary says of the batch, not its bytes.
        let meta = batch.without_bytes();
        let app = self.clone();
        tokio::spawn(async move { app.follow(meta).await });
        true
    }

    /// Follows a batch to its end and files the result (nothing on shutdown).
    async fn follow(&self, batch: ParsedBatch) {
        if let Some(result) = l2_api::follow(&self.gw, &batch).await {
            self.results.lock().expect("never poisoned").insert(batch.number.0, result);
        }
    }

    /// The shared path's submit, bounded by [`SUBMIT_TIMEOUT`]. `Ok(created)`.
    async fn submit(&self, batch: &ParsedBatch) -> Result<bool, ApiError> {
        match tokio::time::timeout(SUBMIT_TIMEOUT, watch::submit(&self.gw, batch)).await {
            Ok(submitted) => submitted.map_err(ApiError::not_taken),
            Err(_) => Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                reason: format!(
                    "the scheduler did not take batch {} within {SUBMIT_TIMEOUT:?}; nothing is lost: send it again",
                    batch.number
                ),
            }),
        }
    }

    /// A request body as JSON of type `T`: 413 over the size limit, 400 if it is not that JSON.
    fn parse<T: DeserializeOwned>(&self, body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
        let body = body.map_err(|r| match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                reason: format!("the body is over --max-body-bytes ({} bytes)", self.max_body_bytes),
            },
            status => ApiError { status, reason: r.body_text() },
        })?;
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_json(&e))
    }
}

/// `POST /submit_request_for_proofs`: 202 `accepted` (new work), 200 `already_known` (the same
/// batch again: no new work), or an [`ApiError`] (409 when the number is taken by other bytes).
async fn submit_request(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<SubmitResponse>), ApiError> {
    let refused = |e: ApiError| {
        tracing::warn!("refused a pushed batch ({}): {}", e.status, e.reason);
        e
    };
    let data: ProofGenerationData = app.parse(body).map_err(refused)?;
    let batch = data.decode().map_err(refused)?;
    let number = batch.number;
    let created = app.submit(&batch).await.map_err(refused)?;
    let started = app.begin(&batch, created);
    let state = app.result(number.0).map_or(ProofStatus::Proving, |r| r.status);
    let (code, status) = if created && started {
        tracing::info!(%number, transactions = batch.transactions, "submitted by the node");
        (StatusCode::ACCEPTED, Submitted::Accepted)
    } else {
        tracing::info!(%number, state = ?state, "pushed again: already known, no new work");
        (StatusCode::OK, Submitted::AlreadyKnown)
    };
    Ok((code, Json(SubmitResponse { batch_number: number.0, status, state })))
}

/// `POST /poll_generated_proofs`: the batch's [`ProofResult`]; 404 for a batch neither this
/// process nor the artifact store knows.
async fn poll(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Result<Json<ProofResult>, ApiError> {
    let PollRequest { batch_number } = app.parse(body)?;
    if let Some(result) = app.result(batch_number) {
        return Ok(Json(result));
    }
    // Unknown to this process: pushed before a restart, or never. The store tells.
    let number = BatchNumber(batch_number);
    let bytes = match app.gw.store.get(&keys::batch_input(number)).await {
        Ok(bytes) => bytes,
        Err(ArtifactError::NotFound { .. }) => {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                reason: format!("batch {number} is unknown: push it with POST {}", paths::SUBMIT_REQUEST_FOR_PROOFS),
            })
        }
        Err(e) => {
            return Err(ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                reason: format!("cannot read batch {number} from the artifact store: {e}"),
            })
        }
    };
    let batch = ParsedBatch::parse(bytes).map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        reason: format!("the stored batch {number} does not parse: {e}"),
    })?;
    tracing::info!(%number, "polled for a batch pushed before this start: following it again");
    let created = app.submit(&batch).await?;
    app.begin(&batch, created);
    let proving = ProofResult::without_proof(batch_number, batch.protocol_version.to_string(), ProofStatus::Proving, None);
    Ok(Json(app.result(batch_number).unwrap_or(proving)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{gateway, node_sim, proven, sample_batch, sample_batch_with, status, submits_of, Script};
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use proofmesh_core::ProtocolVersion;
    use proofmesh_proto::v1::BatchState;
    use serde_json::{json, Value};
    use std::collections::HashMap;

    /// Serves the API for `gw` on a free port of 127.0.0.1; returns its URL.
    async fn start(gw: &Gateway, max_body_bytes: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(serve(gw.clone(), listener, max_body_bytes));
        url
    }

    /// POSTs `body` (raw bytes) to `url`; the status and the JSON answer.
    async fn post(url: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let response = reqwest::Client::new().post(url).body(body).send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")))
    }

    /// Polls until the batch is no longer `proving` (10 s at most).
    async fn poll_until_ended(url: &str, number: u32) -> Value {
        for _ in 0..200 {
            let (code, answer) = post(&format!("{url}/poll_generated_proofs"), json!({"batch_number": number}).to_string()).await;
            assert_eq!(code, 200, "{answer}");
            if answer["status"] != "proving" {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("batch {number} still proving");
    }

    fn push_body(bytes: &[u8]) -> String {
        serde_json::to_string(&ProofGenerationData::of(bytes)).unwrap()
    }

    #[tokio::test]
    async fn the_node_pushes_batches_and_polls_their_proofs() {
        let scripts = HashMap::from([(1, proven(1, b"proof of batch 1")), (2, proven(2, b"proof of batch 2"))]);
        let (dir, gw, calls) = gateway(scripts).await;
        let url = start(&gw, 1 << 20).await;
        let (batches, out) = (dir.path().join("batches"), dir.path().join("out"));
        std::fs::create_dir(&batches).unwrap();
        for n in [1u32, 2] {
            std::fs::write(batches.join(format!("batch_{n:06}.bin")), sample_batch(n)).unwrap();
        }

        let sim = node_sim(&[
            "push",
            "--gateway",
            &url,
            "--batches",
            batches.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--poll-interval-ms",
            "50",
            "--timeout-secs",
            "30",
        ])
        .output();
        let output = tokio::time::timeout(Duration::from_secs(60), sim).await.unwrap().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);

        assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
        assert!(stdout.contains("pushed batch_000001.bin (batch 1): 202 accepted"), "{stdout}");
        for n in [1u32, 2] {
            let proof = std::fs::read(out.join(format!("batch_{n:06}.proof"))).unwrap();
            assert_eq!(proof, format!("proof of batch {n}").as_bytes());
            let summary: Value =
                serde_json::from_slice(&std::fs::read(out.join(format!("batch_{n:06}.json"))).unwrap()).unwrap();
            assert_eq!((summary["batch_number"].as_u64(), summary["protocol_version"].as_str()), (Some(n.into()), Some("0.1.0")));
            assert_eq!((summary["status"].as_str(), summary["proof_bytes"].as_u64()), (Some("proven"), Some(16)));
            assert_eq!(summary["rounds"].as_array().unwrap().len(), 6);
            assert!(summary.get("file").is_none(), "no inbox file: {summary}");
            assert_eq!(submits_of(&calls, n), 1);
        }
        assert_eq!(gw.store.get(&keys::batch_input(BatchNumber(2))).await.unwrap(), sample_batch(2));
        gw.shutdown.cancel();
    }

    #[tokio::test]
    async fn a_failed_batch_is_polled_as_failed_and_the_simulator_exits_non_zero() {
        let mut failed = status(3, BatchState::Failed, &[(0, "basic", 1, 0)]);
        failed.error = "job (0, 1) seq 0: out of attempts".into();
        let scripts = HashMap::from([(3, Script { watches: vec![vec![failed]], proof: Vec::new() })]);
        let (dir, gw, _calls) = gateway(scripts).await;
        let url = start(&gw, 1 << 20).await;
        let (batches, out) = (dir.path().join("batches"), dir.path().join("out"));
        std::fs::create_dir(&batches).unwrap();
        std::fs::write(batches.join("b3.bin"), sample_batch(3)).unwrap();

        let args = ["push", "--gateway", &url, "--batches", batches.to_str().unwrap(), "--out", out.to_str().unwrap(), "--poll-interval-ms", "50", "--timeout-secs", "30"];
        let output = tokio::time::timeout(Duration::from_secs(60), node_sim(&args).output()).await.unwrap().unwrap();

        assert_eq!(output.status.code(), Some(1), "{}", String::from_utf8_lossy(&output.stdout));
        let error = std::fs::read_to_string(out.join("batch_000003.error")).unwrap();
        assert!(error.contains("out of attempts"), "{error}");
        let answer = poll_until_ended(&url, 3).await;
        assert_eq!(answer, json!({"batch_number": 3, "protocol_version": "0.1.0", "status": "failed", "error": "job (0, 1) seq 0: out of attempts"}));
        gw.shutdown.cancel();
    }

    #[tokio::test]
    async fn the_same_batch_twice_is_known_and_other_contents_under_its_number_are_refused() {
        let (_dir, gw, calls) = gateway(HashMap::from([(4, proven(4, b"proof of batch 4"))])).await;
        let url = start(&gw, 1 << 20).await;
        let submit = format!("{url}/submit_request_for_proofs");

        let (code, first) = post(&submit, push_body(&sample_batch(4))).await;
        assert_eq!((code, first), (202, json!({"batch_number": 4, "status": "accepted", "state": "proving"})));
        let proven = poll_until_ended(&url, 4).await;
        assert_eq!(proven["status"], "proven");
        assert_eq!(STANDARD.decode(proven["proof"].as_str().unwrap()).unwrap(), b"proof of batch 4");
        assert_eq!(proven["summary"]["batch_number"], 4);

        let (code, again) = post(&submit, push_body(&sample_batch(4))).await;
        assert_eq!((code, again), (200, json!({"batch_number": 4, "status": "already_known", "state": "proven"})));

        let other = sample_batch_with(4, ProtocolVersion { minor: 1, patch: 0 }, [9, 9, 9, 9]);
        let (code, refused) = post(&submit, push_body(&other)).await;
        assert_eq!(code, 409, "{refused}");
        assert!(refused["error"].as_str().unwrap().contains("batch 4 is already stored"), "{refused}");

        assert_eq!(submits_of(&calls, 4), 2, "the duplicate reached SubmitBatch (created: false), the conflict did not");
        assert_eq!(calls.lock().unwrap().watches[&4], 1, "watched once: no new work");
        assert_eq!(gw.store.get(&keys::batch_input(BatchNumber(4))).await.unwrap(), sample_batch(4), "the first is kept");
        assert_eq!(poll_until_ended(&url, 4).await, proven, "the proof is still the first batch's");
        gw.shutdown.cancel();
    }

    #[tokio::test]
    async fn malformed_requests_get_a_4xx_with_a_reason() {
        let (_dir, gw, calls) = gateway(HashMap::from([(6, proven(6, b"proof of batch 6"))])).await;
        let url = start(&gw, 4096).await;
        let submit = format!("{url}/submit_request_for_proofs");
        let poll = format!("{url}/poll_generated_proofs");
        let good = ProofGenerationData::of(&sample_batch(6));
        let with_file = |batch_file: String| serde_json::to_string(&ProofGenerationData { batch_file, ..good.clone() }).unwrap();
        let unknown_version = sample_batch_with(7, ProtocolVersion { minor: 9, patch: 0 }, [1, 2, 3, 4]);

        let cases: Vec<(&str, String, String, u16, &str)> = vec![
            ("bad JSON", submit.clone(), "{\"batch_number\": 6,".into(), 400, "not the JSON expected"),
            ("missing field", submit.clone(), json!({"batch_number": 6}).to_string(), 400, "missing field `protocol_version`"),
            ("bad base64", submit.clone(), with_file("not base64!".into()), 400, "not valid base64"),
            ("not a batch", submit.clone(), with_file(STANDARD.encode(b"hello")), 400, "field `magic` at byte 0"),
            ("number mismatch", submit.clone(), json!({"batch_number": 5, "protocol_version": "0.1.0", "batch_file": good.batch_file.clone()}).to_string(), 400, "batch_number is 5"),
            ("oversized", submit.clone(), with_file("A".repeat(64 << 10)), 413, "over --max-body-bytes (4096 bytes)"),
            ("unknown version", submit.clone(), push_body(&unknown_version), 422, "protocol version 0.9.0 is not registered"),
            ("poll, bad JSON", poll.clone(), "[]".into(), 400, "not the JSON expected"),
            ("poll, unknown batch", poll.clone(), json!({"batch_number": 12345}).to_string(), 404, "batch 12345 is unknown"),
            ("unknown path", format!("{url}/submit_proof/6"), "{}".into(), 404, "no such endpoint"),
        ];
        for (what, url, body, expected, reason) in cases {
            let (code, answer) = post(&url, body).await;
            assert_eq!(code, expected, "{what}: {answer}");
            let error = answer["error"].as_str().unwrap_or_else(|| panic!("{what}: no error field in {answer}"));
            assert!(error.contains(reason), "{what}: {error:?} does not say {reason:?}");
        }
        let response = reqwest::get(&submit).await.unwrap();
        assert_eq!(response.status().as_u16(), 405);
        assert_eq!(response.json::<Value>().await.unwrap()["error"], "use POST");

        // Nothing was taken (the fake records only the submissions it accepts), and the server
        // still works.
        assert!(calls.lock().unwrap().submits.is_empty());
        let (code, _) = post(&submit, with_file(good.batch_file.clone())).await;
        assert_eq!(code, 202);
        assert_eq!(poll_until_ended(&url, 6).await["status"], "proven");
        gw.shutdown.cancel();
    }

    #[tokio::test]
    async fn a_poll_after_a_restart_follows_the_stored_batch_again() {
        let (_dir, gw, calls) = gateway(HashMap::from([(8, proven(8, b"proof of batch 8"))])).await;
        // An earlier gateway process stored and submitted batch 8, then stopped.
        crate::watch::submit(&gw, &ParsedBatch::parse(sample_batch(8)).unwrap()).await.unwrap();
        let url = start(&gw, 1 << 20).await;

        let answer = poll_until_ended(&url, 8).await;

        assert_eq!(answer["status"], "proven");
        assert_eq!(STANDARD.decode(answer["proof"].as_str().unwrap()).unwrap(), b"proof of batch 8");
        assert_eq!(submits_of(&calls, 8), 2, "submitted again: idempotent, no new work");
        gw.shutdown.cancel();
    }
}
