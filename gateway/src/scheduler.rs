//! The gateway's side of the scheduler connection: connecting (with backoff, since the scheduler
//! may start after the gateway), calls retried while the scheduler is away, and which errors
//! are worth retrying.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use proofmesh_core::BatchNumber;
use proofmesh_proto::v1::batches_client::BatchesClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};

use proofmesh_core::backoff::Backoff;

/// The gateway's backoff for every call to the scheduler: 250 ms doubling up to 10 s, so a
/// scheduler that comes back is noticed within 10 s.
pub(crate) fn backoff() -> Backoff {
    Backoff::new(Duration::from_millis(250), Duration::from_secs(10))
}

/// Connects to the scheduler's `Batches` service at `url` (over mutual TLS if `tls` says so),
/// retrying with backoff and logging each wait. `Ok(None)` if `shutdown` was cancelled first.
/// Errors: `url` is not a valid URI, the TLS files do not load.
///
/// Once connected, the channel reconnects by itself; calls made while the scheduler is away fail
/// with `UNAVAILABLE` (see [`retrying`]). HTTP/2 keep-alives notice a scheduler host that
/// vanished without closing the connection, which would otherwise leave a `WatchBatch` stream
/// waiting for ever.
pub(crate) async fn connect(
    url: &str,
    tls: &proofmesh_proto::TlsArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<BatchesClient<Channel>>> {
    let endpoint = tls
        .endpoint(url)
        .with_context(|| format!("scheduler URL `{url}`"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let mut backoff = backoff();
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            attempt = endpoint.connect() => attempt,
        };
        match attempt {
            Ok(channel) => {
                tracing::info!("connected to the scheduler at {url}");
                return Ok(Some(BatchesClient::new(channel)));
            }
            Err(e) => tracing::warn!(
                "waiting for the scheduler at {url}: {}; retrying in {:?}",
                error_chain(&e),
                backoff.delay()
            ),
        }
        if !backoff.wait(shutdown).await {
            return Ok(None);
        }
    }
}

/// Why a call to the scheduler gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The gateway is shutting down.
    Shutdown,
    /// The scheduler answered with an error retrying cannot help: its code, and a text that
    /// names the call (`SubmitBatch: FailedPrecondition: ...`).
    Refused { code: Code, reason: String },
}

/// Runs `call` until it succeeds, retrying with backoff while the error is transient
/// ([`is_transient`]). `what` names the call in log lines and in [`Stop::Refused`].
pub(crate) async fn retrying<T, F, Fut>(
    shutdown: &CancellationToken,
    batch: BatchNumber,
    what: &str,
    mut call: F,
) -> Result<T, Stop>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut backoff = backoff();
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return Err(Stop::Shutdown),
            result = call() => result,
        };
        match result {
            Ok(v) => return Ok(v),
            Err(s) if is_transient(&s) => {
                tracing::warn!(%batch, "{what}: {}; retrying in {:?}", describe(&s), backoff.delay());
            }
            Err(s) => return Err(Stop::Refused { code: s.code(), reason: format!("{what}: {}", describe(&s)) }),
        }
        if !backoff.wait(shutdown).await {
            return Err(Stop::Shutdown);
        }
    }
}

/// True for errors that come from the scheduler being away or busy (restarting, overloaded, a
/// broken connection), not from the request: retrying later can succeed.
pub(crate) fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Cancelled
    )
}

/// A status as one line: its code, its message, and the transport errors underneath (tonic's
/// own `Display` adds metadata and details nobody reads).
pub(crate) fn describe(status: &Status) -> String {
    let mut out = format!("{:?}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(status) {
        out.push_str(": ");
        out.push_str(&error_chain(source));
    }
    out
}

/// An error and its sources, joined by `: ` ("transport error: connection refused"). A source
/// that repeats the text before it (hyper and tonic wrap with the same words) is shown once.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if text != last {
            out.push_str(": ");
            out.push_str(&text);
            last = text;
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_and_others_are_not() {
        let token = CancellationToken::new();
        let calls = AtomicU32::new(0);
        let ok = retrying(&token, BatchNumber(1), "SubmitBatch", || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 => Err(Status::unavailable("restarting")),
                _ => Ok(7),
            }
        })
        .await;
        assert_eq!(ok, Ok(7));
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        let refused = retrying(&token, BatchNumber(1), "SubmitBatch", || async {
            Err::<(), _>(Status::invalid_argument("protocol version 0.9.0 is not served"))
        })
        .await;
        assert_eq!(
            refused,
            Err(Stop::Refused {
                code: Code::InvalidArgument,
                reason: "SubmitBatch: InvalidArgument: protocol version 0.9.0 is not served".into()
            })
        );

        token.cancel();
        let stopped =
            retrying(&token, BatchNumber(1), "GetProof", || async { Err::<(), _>(Status::unavailable("down")) }).await;
        assert_eq!(stopped, Err(Stop::Shutdown));
    }
}
