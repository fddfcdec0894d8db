//! Logging set-up shared by the binaries: `tracing` to stderr, filtered by `RUST_LOG`.

/// Installs the global subscriber: human-readable lines on stderr, the filter from `RUST_LOG`
/// or else `default` (e.g. `"info"`, `"info,sqlx=warn"`). Call once, first thing in `main`.
pub fn init_logs(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
