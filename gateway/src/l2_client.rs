//! `--mode client`: the gateway polls the L2 node for batches (`POST {node}/proof_generation_data`)
//! and posts each result back (`POST {node}/submit_proof/{batch_number}`). Shapes in `l2_api.rs`
//! and `docs/gateway-api.md`.
//!
//! A batch goes along the shared path: [`watch::submit`] in the poll loop (so batches are
//! stored and submitted in the order the node hands them out, and a scheduler that is away
//! stops the polling instead of piling batches up), then a task per batch that follows it and
//! posts the result, retrying while the node is away.
//!
//! A batch the node hands out again while this gateway follows it is recognised (same bytes: no
//! new work; other bytes: refused through the store's check). Handed out again after its result
//! was posted, it is fetched and posted again, not proven again (`SubmitBatch` is idempotent).
//! A batch the gateway refuses is posted back as `rejected` with the reason when the node's
//! answer named its number. If the gateway stops, the batches it was following are the node's
//! to hand out again, as for any prover that goes away.

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::l2_api::{self, paths, ProofGenerationData, ProofGenerationDataResponse, ProofResult, ProofStatus};
use crate::scheduler::{backoff, error_chain};
use crate::watch::{self, Gateway, NotTaken, ParsedBatch};

/// How long one HTTP exchange with the node may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// The client mode's settings (from the command line).
#[derive(Debug, Clone)]
pub(crate) struct ClientSettings {
    /// The node's base URL: `http://node:3320`.
    pub node_url: String,
    /// Wait between two polls when the node had nothing (or did not answer).
    pub poll_interval: Duration,
    /// Largest answer read from the node, bytes.
    pub max_body_bytes: usize,
}

/// Polls the node until shutdown, then waits for the batch tasks (which stop at shutdown too).
/// Errors: the HTTP client cannot be built.
pub(crate) async fn run(gw: Gateway, settings: ClientSettings) -> anyhow::Result<ExitCode> {
    let node = Node::new(&settings)?;
    let in_flight = Arc::new(Mutex::new(HashSet::new()));
    let mut tasks = JoinSet::new();
    let mut node_away = false;
    tracing::info!("polling the L2 node at {} every {:?} when idle", node.url, settings.poll_interval);
    loop {
        let next = tokio::select! {
            _ = gw.shutdown.cancelled() => break,
            next = node.next_batch() => next,
        };
        let idle = match next {
            Ok(Some(data)) => {
                node_away = false;
                take(&gw, &node, data, &in_flight, &mut tasks).await;
                false
            }
            Ok(None) => {
                if std::mem::take(&mut node_away) {
                    tracing::info!("the L2 node answers again");
                }
                true
            }
            Err(e) => {
                if !std::mem::replace(&mut node_away, true) {
                    tracing::warn!("cannot get a batch from the L2 node (retrying every {:?}): {e}", settings.poll_interval);
                }
                true
            }
        };
        while let Some(joined) = tasks.try_join_next() {
            if let Err(e) = joined {
                tracing::error!("a batch task ended abnormally: {e}");
            }
        }
        if idle {
            tokio::select! {
                _ = gw.shutdown.cancelled() => break,
                _ = tokio::time::sleep(settings.poll_interval) => {}
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    Ok(ExitCode::SUCCESS)
}

/// One batch the node handed out: submits it, and starts a task that follows it unless one
/// already does. A batch that is refused is posted back as `rejected`.
async fn take(
    gw: &Gateway,
    node: &Node,
    data: ProofGenerationData,
    in_flight: &Arc<Mutex<HashSet<u32>>>,
    tasks: &mut JoinSet<()>,
) {
    let number = data.batch_number;
    let batch = match data.decode() {
        Ok(batch) => batch,
        Err(e) => return reject(gw, node, number, data.protocol_version, e.reason, tasks),
    };
    let created = match watch::submit(gw, &batch).await {
        Ok(created) => created,
        Err(NotTaken::Shutdown) => return,
        Err(e) => return reject(gw, node, number, data.protocol_version, e.reason(), tasks),
    };
    if !in_flight.lock().expect("never poisoned").insert(number) {
        tracing::info!(batch = number, "handed out again while being proven: no new work");
        return;
    }
    if created {
        tracing::info!(batch = number, transactions = batch.transactions, "submitted");
    } else {
        tracing::info!(batch = number, "already submitted: fetching its result again");
    }
    let (gw, node, in_flight, batch) = (gw.clone(), node.clone(), in_flight.clone(), batch.without_bytes());
    tasks.spawn(async move {
        prove(&gw, &node, batch).await;
        in_flight.lock().expect("never poisoned").remove(&number);
    });
}

/// Follows a submitted batch and posts its result.
async fn prove(gw: &Gateway, node: &Node, batch: ParsedBatch) {
    if let Some(result) = l2_api::follow(gw, &batch).await {
        node.submit_result(&result, &gw.shutdown).await;
    }
}

/// A batch refused before the scheduler took it: logged, counted, posted back (in a task, so
/// that a node that is slow to take it does not hold up polling).
fn reject(gw: &Gateway, node: &Node, number: u32, version: String, reason: String, tasks: &mut JoinSet<()>) {
    tracing::error!(batch = number, "rejected a batch from the node: {reason}");
    watch::count("rejected");
    let result = ProofResult::without_proof(number, version, ProofStatus::Rejected, Some(reason));
    let (node, shutdown) = (node.clone(), gw.shutdown.clone());
    tasks.spawn(async move {
        node.submit_result(&result, &shutdown).await;
    });
}

/// The node's proof data API. Cheap to clone.
#[derive(Debug, Clone)]
struct Node {
    http: reqwest::Client,
    /// Without a trailing `/`.
    url: String,
    max_body_bytes: usize,
}

impl Node {
    fn new(settings: &ClientSettings) -> anyhow::Result<Node> {
        let http = reqwest::Client::builder().timeout(HTTP_TIMEOUT).build().context("cannot build the HTTP client")?;
        Ok(Node { http, url: settings.node_url.trim_end_matches('/').to_string(), max_body_bytes: settings.max_body_bytes })
    }

    /// `POST /proof_generation_data`: the next batch, or `None`. Errors (one line): the node
    /// cannot be reached, answered non-2xx, or its answer is over the size limit or not the JSON
    /// expected.
    async fn next_batch(&self) -> Result<Option<ProofGenerationData>, String> {
        let url = format!("{}{}", self.url, paths::PROOF_GENERATION_DATA);
        let response = self.http.post(&url).json(&serde_json::json!({})).send().await.map_err(|e| error_chain(&e))?;
        let status = response.status();
        let body = read_limited(response, self.max_body_bytes).await?;
        if !status.is_success() {
            return Err(format!("{url} answered {status}: {}", excerpt(&body)));
        }
        let answer: ProofGenerationDataResponse = serde_json::from_slice(&body)
            .map_err(|e| format!("{url} answered with something else than the JSON expected: {e}: {}", excerpt(&body)))?;
        Ok(answer.data)
    }

    /// `POST /submit_proof/{batch_number}` with `result`, retried with backoff while the node is
    /// away or answers 5xx; a 4xx is logged and not retried. False if it was not delivered.
    async fn submit_result(&self, result: &ProofResult, shutdown: &CancellationToken) -> bool {
        let number = result.batch_number;
        let url = format!("{}{}/{number}", self.url, paths::SUBMIT_PROOF);
        let mut backoff = backoff();
        loop {
            let sent = tokio::select! {
                _ = shutdown.cancelled() => return false,
                sent = self.http.post(&url).json(result).send() => sent,
            };
            match sent {
                Ok(response) if response.status().is_success() => {
                    tracing::info!(batch = number, status = ?result.status, "result handed to the node");
                    return true;
                }
                Ok(response) if response.status().is_client_error() => {
                    let status = response.status();
                    let body = read_limited(response, 4096).await.unwrap_or_default();
                    tracing::error!(batch = number, "the node refused the result: {status}: {}", excerpt(&body));
                    return false;
                }
                Ok(response) => tracing::warn!(
                    batch = number,
                    "the node answered {} to the result; retrying in {:?}",
                    response.status(),
                    backoff.delay()
                ),
                Err(e) => tracing::warn!(
                    batch = number,
                    "cannot hand the result to the node: {}; retrying in {:?}",
                    error_chain(&e),
                    backoff.delay()
                ),
            }
            if !backoff.wait(shutdown).await {
                return false;
            }
        }
    }
}

/// The body of `response`, refused once it passes `max` bytes (never held whole beyond that).
async fn read_limited(mut response: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    let too_big = || format!("the node's answer is over --max-body-bytes ({max} bytes)");
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| error_chain(&e))? {
        if body.len() + chunk.len() > max {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The start of a body, for an error line.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    text.trim().replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{gateway, node_sim, proven, sample_batch, submits_of};
    use proofmesh_core::{keys, BatchNumber};
    use std::collections::HashMap;
    use tokio::io::{AsyncBufReadExt, BufReader};

    #[tokio::test]
    async fn the_gateway_takes_batches_from_the_node_and_posts_the_proofs_back() {
        let scripts = HashMap::from([(1, proven(1, b"proof of batch 1")), (2, proven(2, b"proof of batch 2"))]);
        let (dir, gw, calls) = gateway(scripts).await;
        let (batches, out) = (dir.path().join("batches"), dir.path().join("out"));
        std::fs::create_dir(&batches).unwrap();
        for n in [1u32, 2] {
            std::fs::write(batches.join(format!("batch_{n:06}.bin")), sample_batch(n)).unwrap();
        }
        // The node hands out batch 1, batch 1 again (same bytes), batch 1 with other bytes,
        // batch 2, then a body that is not a batch file (as batch 999).
        let mut sim = node_sim(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--batches",
            batches.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--duplicate",
            "--conflict",
            "--malformed",
            "--malformed-number",
            "999",
            "--exit-when-done",
            "--timeout-secs",
            "30",
        ])
        .spawn()
        .unwrap();
        let mut stdout = BufReader::new(sim.stdout.take().unwrap()).lines();
        let first = stdout.next_line().await.unwrap().expect("the simulator says where it listens");
        let node_url = first.rsplit(' ').next().unwrap().to_string();
        assert!(node_url.starts_with("http://127.0.0.1:"), "{first}");
        let settings =
            ClientSettings { node_url, poll_interval: Duration::from_millis(50), max_body_bytes: 1 << 20 };
        let client = tokio::spawn(run(gw.clone(), settings));

        let mut printed = vec![first];
        let status = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = stdout.next_line().await.unwrap() {
                printed.push(line);
            }
            sim.wait().await.unwrap()
        })
        .await
        .unwrap_or_else(|_| panic!("the simulator did not finish:\n{}", printed.join("\n")));
        let printed = printed.join("\n");

        assert!(status.success(), "{printed}");
        for n in [1u32, 2] {
            let proof = std::fs::read(out.join(format!("batch_{n:06}.proof"))).unwrap();
            assert_eq!(proof, format!("proof of batch {n}").as_bytes(), "{printed}");
            let summary: serde_json::Value =
                serde_json::from_slice(&std::fs::read(out.join(format!("batch_{n:06}.json"))).unwrap()).unwrap();
            assert_eq!((summary["batch_number"].as_u64(), summary["status"].as_str()), (Some(n.into()), Some("proven")));
        }
        let conflict = std::fs::read_to_string(out.join("batch_000001.rejected")).unwrap();
        assert!(conflict.contains("batch 1 is already stored") && conflict.contains("other contents"), "{conflict}");
        let malformed = std::fs::read_to_string(out.join("batch_000999.rejected")).unwrap();
        assert!(malformed.contains("not a batch") && malformed.contains("field `magic` at byte 0"), "{malformed}");
        assert_eq!(submits_of(&calls, 1), 2, "the duplicate is submitted again (created: false), the conflict is not");
        assert_eq!(submits_of(&calls, 2), 1);
        assert_eq!(submits_of(&calls, 999), 0);
        assert_eq!(gw.store.get(&keys::batch_input(BatchNumber(1))).await.unwrap(), sample_batch(1), "the first is kept");

        gw.shutdown.cancel();
        let code = tokio::time::timeout(Duration::from_secs(10), client).await.unwrap().unwrap().unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
    }

    #[tokio::test]
    async fn a_node_that_is_away_or_answers_garbage_is_waited_for() {
        let (_dir, gw, _calls) = gateway(HashMap::new()).await;
        // Nothing listens on this port (bound, then released).
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let node = Node::new(&ClientSettings {
            node_url: format!("http://127.0.0.1:{port}/"),
            poll_interval: Duration::from_millis(10),
            max_body_bytes: 64,
        })
        .unwrap();
        let err = node.next_batch().await.unwrap_err();
        assert!(err.contains("onnect"), "{err}");

        // A node answering too much, or not JSON: errors, no panic.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            for body in ["x".repeat(100), "not json".to_string()] {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await.unwrap();
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                socket.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let node = Node { url: format!("http://{addr}"), ..node };
        let err = node.next_batch().await.unwrap_err();
        assert!(err.contains("over --max-body-bytes (64 bytes)"), "{err}");
        let err = node.next_batch().await.unwrap_err();
        assert!(err.contains("something else than the JSON expected"), "{err}");
        gw.shutdown.cancel();
    }
}
