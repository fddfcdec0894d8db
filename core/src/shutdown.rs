//! The one shutdown path of every binary: Ctrl-C or SIGTERM cancels a token that every loop
//! selects on (tokio's mini-redis `shutdown.rs` pattern). What stopping means for each process is
//! said where its loops stop; nothing durable lives outside PostgreSQL and the artifact store.

use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first Ctrl-C (SIGINT) or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let signal = wait_for_signal().await;
        tracing::info!("{signal}: shutting down");
        token.cancel();
    });
}

#[cfg(unix)]
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM ({e}); only Ctrl-C stops this process");
            ctrl_c().await;
            "SIGINT"
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> &'static str {
    ctrl_c().await;
    "Ctrl-C"
}

/// Resolves on Ctrl-C. If the handler cannot be installed it never resolves: an error here must
/// not look like a request to stop.
async fn ctrl_c() {
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::warn!("cannot listen for Ctrl-C ({e})");
        std::future::pending::<()>().await;
    }
}
