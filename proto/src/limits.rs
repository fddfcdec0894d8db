//! Limits every gRPC server of the cluster applies, so that a misbehaving or hostile client
//! cannot exhaust a server's memory or tasks: the largest message decoded, concurrent requests
//! per connection (beyond which requests are refused at once, `RESOURCE_EXHAUSTED`: load
//! shedding instead of an unbounded queue), HTTP/2 streams per connection, a deadline for each
//! handler to answer, and keepalive pings that drop dead connections. All are settings
//! (`--grpc-*` flags, `PROOFMESH_GRPC_*`), the same on the scheduler and on provers.

use std::time::Duration;

use tonic::transport::Server;

/// The server limits (see the module docs). `Default` gives the flags' defaults.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct GrpcLimits {
    /// Largest gRPC message a server decodes, MiB (a batch in `SubmitBatch`, one witness-vector
    /// chunk); a larger one is refused (`OUT_OF_RANGE`) before it is buffered whole.
    #[arg(long = "grpc-max-message-mib", env = "PROOFMESH_GRPC_MAX_MESSAGE_MIB", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=2047))]
    pub max_message_mib: u32,
    /// Requests in flight per connection, open streams included; one more is refused at once
    /// with `RESOURCE_EXHAUSTED` (a worker uses one stream; an operator's tool a few calls).
    #[arg(long = "grpc-concurrency-per-connection", env = "PROOFMESH_GRPC_CONCURRENCY_PER_CONNECTION",
          default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency_per_connection: u32,
    /// HTTP/2 streams a client may open at once on one connection (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    #[arg(long = "grpc-max-concurrent-streams", env = "PROOFMESH_GRPC_MAX_CONCURRENT_STREAMS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,
    /// Seconds a handler has to answer (`DEADLINE_EXCEEDED` after). A stream's handler answers
    /// when the stream opens, so long-lived streams are not cut; a witness-vector push is
    /// answered once received whole, so this bounds a push's transfer time too.
    #[arg(long = "grpc-request-timeout-secs", env = "PROOFMESH_GRPC_REQUEST_TIMEOUT_SECS", default_value_t = 600)]
    pub request_timeout_secs: u64,
    /// Seconds between HTTP/2 pings on an idle connection; one unanswered for as long again
    /// closes the connection (a vanished peer's streams end instead of lingering).
    #[arg(long = "grpc-keepalive-secs", env = "PROOFMESH_GRPC_KEEPALIVE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub keepalive_secs: u64,
}

impl Default for GrpcLimits {
    fn default() -> Self {
        GrpcLimits {
            max_message_mib: 64,
            concurrency_per_connection: 32,
            max_concurrent_streams: 64,
            request_timeout_secs: 600,
            keepalive_secs: 30,
        }
    }
}

impl GrpcLimits {
    /// A server builder with these limits (and `TCP_NODELAY`). Services must also be given
    /// [`GrpcLimits::max_message_bytes`] (`XServer::new(..).max_decoding_message_size(..)`).
    pub fn server(&self) -> Server {
        let keepalive = Duration::from_secs(self.keepalive_secs);
        Server::builder()
            .tcp_nodelay(true)
            .concurrency_limit_per_connection(self.concurrency_per_connection as usize)
            .load_shed(true)
            .max_concurrent_streams(self.max_concurrent_streams)
            .timeout(Duration::from_secs(self.request_timeout_secs.max(1)))
            .http2_keepalive_interval(Some(keepalive))
            .http2_keepalive_timeout(Some(keepalive))
    }

    /// The largest message decoded, bytes.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_mib as usize * (1 << 20)
    }
}
