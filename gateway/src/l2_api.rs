//! The L2 node's proof data API: the JSON bodies both L2 modes exchange with the node, and the
//! HTTP errors (`docs/gateway-api.md` has every shape with examples).
//!
//! Close in spirit to zkSync Era's proof data handler: the node hands out a batch's witness
//! inputs (here: our batch file) and receives the final proof. Binary payloads (the batch file,
//! the proof) are base64 strings (standard alphabet, padded). Every body names the batch
//! (`batch_number`) and the protocol version (`"0.MINOR.PATCH"`, e.g. `"0.1.0"`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use proofmesh_core::{BatchNumber, ProtocolVersion};
use serde::{Deserialize, Serialize};
use tonic::Code;

use crate::summary::ProofSummary;
use crate::watch::{self, Ended, Gateway, NotTaken, ParsedBatch};

/// Paths, relative to the node's URL (client mode) or the gateway's `--listen` (server mode).
pub(crate) mod paths {
    /// Client mode: the gateway asks the node for a batch (`POST`, body `{}`), answer
    /// [`super::ProofGenerationDataResponse`].
    pub const PROOF_GENERATION_DATA: &str = "/proof_generation_data";
    /// Client mode: the gateway hands back a result (`POST /submit_proof/{batch_number}`, body
    /// [`super::ProofResult`]).
    pub const SUBMIT_PROOF: &str = "/submit_proof";
    /// Server mode: the node pushes a batch (`POST`, body [`super::ProofGenerationData`]),
    /// answer [`super::SubmitResponse`].
    pub const SUBMIT_REQUEST_FOR_PROOFS: &str = "/submit_request_for_proofs";
    /// Server mode: the node asks for a result (`POST`, body [`super::PollRequest`]), answer
    /// [`super::ProofResult`].
    pub const POLL_GENERATED_PROOFS: &str = "/poll_generated_proofs";
}

/// One batch to prove, as the node hands it over: the `data` of a `/proof_generation_data`
/// answer (client mode) and the body of `/submit_request_for_proofs` (server mode).
///
/// `{"batch_number": 1, "protocol_version": "0.1.0", "batch_file": "UE1CVAEAAQAAAAEA..."}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProofGenerationData {
    /// The batch's number; must equal the number inside `batch_file`.
    pub batch_number: u32,
    /// `"0.MINOR.PATCH"`; must equal the version inside `batch_file`.
    pub protocol_version: String,
    /// The batch file (`core/src/batch.rs`), base64.
    pub batch_file: String,
}

impl ProofGenerationData {
    /// The batch file, decoded and parsed, once the request's own fields agree with it.
    ///
    /// Errors (all 400 Bad Request): `batch_file` is not base64 or not a batch file (the reason
    /// names the field and byte offset), `protocol_version` is not `0.MINOR.PATCH`, or
    /// `batch_number` / `protocol_version` differ from the file's.
    pub(crate) fn decode(&self) -> Result<ParsedBatch, ApiError> {
        let bytes = STANDARD
            .decode(self.batch_file.as_bytes())
            .map_err(|e| ApiError::bad_request(format!("batch_file is not valid base64: {e}")))?;
        let version: ProtocolVersion = self.protocol_version.parse().map_err(ApiError::bad_request)?;
        let batch =
            ParsedBatch::parse(bytes).map_err(|e| ApiError::bad_request(format!("batch_file is not a batch: {e}")))?;
        if batch.number != BatchNumber(self.batch_number) {
            return Err(ApiError::bad_request(format!(
                "batch_number is {} but batch_file holds batch {}",
                self.batch_number, batch.number
            )));
        }
        if batch.protocol_version != version {
            return Err(ApiError::bad_request(format!(
                "protocol_version is {version} but batch_file is of protocol version {}",
                batch.protocol_version
            )));
        }
        Ok(batch)
    }

    /// The request for `batch` (the simulator's side; used by tests).
    #[cfg(test)]
    pub(crate) fn of(bytes: &[u8]) -> ProofGenerationData {
        let batch = ParsedBatch::parse(bytes.to_vec()).expect("a valid batch");
        ProofGenerationData {
            batch_number: batch.number.0,
            protocol_version: batch.protocol_version.to_string(),
            batch_file: STANDARD.encode(bytes),
        }
    }
}

/// The node's answer to `POST /proof_generation_data`: a batch, or `{"data": null}` when it
/// has none to prove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProofGenerationDataResponse {
    /// The next batch to prove, if any.
    pub data: Option<ProofGenerationData>,
}

/// The body of `POST /poll_generated_proofs`: `{"batch_number": 1}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PollRequest {
    /// The batch asked about.
    pub batch_number: u32,
}

/// Where a batch stands, as the gateway knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ProofStatus {
    /// Accepted, not ended yet ("not ready").
    Proving,
    /// The final proof is ready.
    Proven,
    /// The scheduler gave up on it (`error` says why).
    Failed,
    /// Never proven: refused before the scheduler took it (client mode only; server mode
    /// answers the push with a 4xx instead).
    Rejected,
}

/// A batch's result: the answer to `/poll_generated_proofs` (server mode) and the body the
/// gateway posts to `/submit_proof/{batch_number}` (client mode).
///
/// Proven: `{"batch_number": 1, "protocol_version": "0.1.0", "status": "proven", "proof":
/// "<base64>", "summary": {...}}`; `summary` is the `<stem>.json` of the inbox mode (without
/// `file`). Otherwise `proof` and `summary` are absent; `failed` and `rejected` carry `error`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ProofResult {
    /// The batch.
    pub batch_number: u32,
    /// Its protocol version, `"0.MINOR.PATCH"` (the one the node sent, if it did not parse).
    pub protocol_version: String,
    /// Where it stands.
    pub status: ProofStatus,
    /// `proven` only: the final proof file, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
    /// `proven` only: the proof's public inputs the gateway knows (batch number, protocol
    /// version) and how it was proven (circuits per round, sizes, seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<ProofSummary>,
    /// `failed` and `rejected` only: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ProofResult {
    /// A result without proof: `proving`, `failed` or `rejected` (with `error` for the latter two).
    pub(crate) fn without_proof(
        batch_number: u32,
        protocol_version: String,
        status: ProofStatus,
        error: Option<String>,
    ) -> ProofResult {
        ProofResult { batch_number, protocol_version, status, proof: None, summary: None, error }
    }

    /// A proven result: `proof` is encoded to base64.
    pub(crate) fn proven(summary: ProofSummary, proof: &[u8]) -> ProofResult {
        ProofResult {
            batch_number: summary.batch_number,
            protocol_version: summary.protocol_version.clone(),
            status: ProofStatus::Proven,
            proof: Some(STANDARD.encode(proof)),
            summary: Some(summary),
            error: None,
        }
    }
}

/// How the gateway took a pushed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Submitted {
    /// New work: the batch is proving (HTTP 202).
    Accepted,
    /// The same batch (number and bytes) was submitted before: no new work (HTTP 200); `state`
    /// says where it stands.
    AlreadyKnown,
}

/// The answer to `POST /submit_request_for_proofs` when the batch was taken:
/// `{"batch_number": 1, "status": "accepted", "state": "proving"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SubmitResponse {
    /// The batch.
    pub batch_number: u32,
    /// New work, or a batch the gateway already has.
    pub status: Submitted,
    /// Where the batch stands now (`proving` right after `accepted`).
    pub state: ProofStatus,
}

/// Every refusal: an HTTP status and `{"error": "<reason>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    /// What was wrong, in one line.
    pub error: String,
}

/// A refused request: its HTTP status (always 4xx or 5xx) and the reason, answered as
/// [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    /// 400 malformed request, 404 unknown batch or path, 409 batch number taken by other
    /// contents, 413 body over `--max-body-bytes`, 422 refused by the scheduler (protocol version
    /// not registered or retired), 500 artifact store failure, 502 other scheduler errors, 503
    /// scheduler not answering or gateway shutting down.
    pub status: StatusCode,
    /// One line.
    pub reason: String,
}

impl ApiError {
    /// A 400 Bad Request.
    pub(crate) fn bad_request(reason: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, reason: reason.into() }
    }

    /// A body that is not the JSON expected (400), saying where.
    pub(crate) fn bad_json(e: &serde_json::Error) -> ApiError {
        ApiError::bad_request(format!("the body is not the JSON expected: {e}"))
    }

    /// The HTTP status for why `submit` did not take a batch.
    pub(crate) fn not_taken(e: NotTaken) -> ApiError {
        let status = match &e {
            NotTaken::Shutdown => StatusCode::SERVICE_UNAVAILABLE,
            NotTaken::Conflict(_) => StatusCode::CONFLICT,
            NotTaken::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            NotTaken::Refused { code, .. } => match code {
                Code::FailedPrecondition | Code::InvalidArgument | Code::OutOfRange | Code::AlreadyExists => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                _ => StatusCode::BAD_GATEWAY,
            },
        };
        ApiError { status, reason: e.reason() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: self.reason })).into_response()
    }
}

/// Follows a submitted batch to its end (the shared path's [`watch::follow`]) and gives its
/// result as both L2 API modes hand it to the node, logged and counted; `None` if the gateway
/// stopped first (the batch is followed again after a restart).
pub async fn follow(gw: &Gateway, batch: &ParsedBatch) -> Option<ProofResult> {
    let number = batch.number;
    let result = match watch::follow(gw, number, &format!("batch {number}")).await {
        Ended::Proven { proof, status } => {
            tracing::info!(%number, proof_bytes = proof.len(), "proven");
            ProofResult::proven(watch::summary(batch, None, proof.len(), &status), &proof)
        }
        Ended::Failed { reason, .. } => {
            tracing::error!(%number, "failed: {reason}");
            ProofResult::without_proof(number.0, batch.protocol_version.to_string(), ProofStatus::Failed, Some(reason))
        }
        Ended::Interrupted => return None,
    };
    watch::count(if result.status == ProofStatus::Proven { "proven" } else { "failed" });
    Some(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::sample_batch;

    #[test]
    fn a_request_decodes_only_when_it_agrees_with_its_file() {
        let good = ProofGenerationData::of(&sample_batch(3));
        assert_eq!(good.decode().unwrap().number, BatchNumber(3));
        let json = serde_json::to_value(&good).unwrap();
        assert_eq!(json["protocol_version"], "0.1.0");
        assert!(json["batch_file"].as_str().unwrap().starts_with("UE1CVA"), "base64 of PMBT...");

        let refused = |data: ProofGenerationData| data.decode().unwrap_err();
        let e = refused(ProofGenerationData { batch_file: "%%%".into(), ..good.clone() });
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.reason.contains("not valid base64"), "{e:?}");
        let e = refused(ProofGenerationData { batch_file: STANDARD.encode(b"not a batch"), ..good.clone() });
        assert!(e.reason.contains("field `magic` at byte 0"), "{e:?}");
        let e = refused(ProofGenerationData { batch_number: 4, ..good.clone() });
        assert!(e.reason.contains("batch_number is 4 but batch_file holds batch 3"), "{e:?}");
        let e = refused(ProofGenerationData { protocol_version: "0.2.0".into(), ..good.clone() });
        assert!(e.reason.contains("protocol_version is 0.2.0"), "{e:?}");
        let e = refused(ProofGenerationData { protocol_version: "one".into(), ..good });
        assert!(e.reason.contains("expected 0.MINOR.PATCH"), "{e:?}");
    }

    #[test]
    fn results_carry_only_the_fields_of_their_status() {
        let proving = ProofResult::without_proof(2, "0.1.0".into(), ProofStatus::Proving, None);
        assert_eq!(
            serde_json::to_value(&proving).unwrap(),
            serde_json::json!({"batch_number": 2, "protocol_version": "0.1.0", "status": "proving"})
        );
        let failed = ProofResult::without_proof(2, "0.1.0".into(), ProofStatus::Failed, Some("out of attempts".into()));
        assert_eq!(serde_json::to_value(&failed).unwrap()["error"], "out of attempts");
        let e = ApiError::not_taken(NotTaken::Refused {
            code: Code::FailedPrecondition,
            reason: "SubmitBatch: FailedPrecondition: protocol version 0.9.0 is not registered".into(),
        });
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(ApiError::not_taken(NotTaken::Conflict("x".into())).status, StatusCode::CONFLICT);
    }
}
