//! A real S3-protocol server for tests: `moto_server` (PyPI `moto[server]`, installed into
//! `.venv` by `scripts/test-tools.sh`; `make test` puts `.venv/bin` on PATH), on a free port of
//! 127.0.0.1, stopped when dropped. Feature `test-server`; never in a binary.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{Credentials, Region};

/// The access key the tests use (moto accepts any).
pub const ACCESS_KEY: &str = "testing";
/// The secret key the tests use.
pub const SECRET_KEY: &str = "testing";

/// A running moto_server.
#[derive(Debug)]
pub struct MotoServer {
    port: u16,
    child: Child,
}

impl MotoServer {
    /// Starts one on a free port and waits (up to 30 s) until it listens. Panics, saying how to
    /// install it, if `moto_server` is not on PATH.
    pub fn start() -> MotoServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        MotoServer::start_on(port)
    }

    /// Starts one on `port` (e.g. the port of one that was stopped: a restart; moto keeps no
    /// state across restarts, so buckets must be made again).
    pub fn start_on(port: u16) -> MotoServer {
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start moto_server ({e}): run scripts/test-tools.sh and put .venv/bin on PATH (make test does)")
            });
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not listen on port {port} within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        MotoServer { port, child }
    }

    /// Its TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `--artifacts` URL of `bucket/prefix` on this server, with `options` appended
    /// (`&name=value...`).
    pub fn url(&self, bucket: &str, prefix: &str, options: &str) -> String {
        format!("s3://{bucket}/{prefix}?endpoint={}&region=us-east-1{options}", self.endpoint())
    }

    /// The test credentials.
    pub fn credentials() -> Credentials {
        Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "tests")
    }

    /// A plain SDK client, for what stores never do (make buckets, damage objects).
    pub fn raw_client(&self) -> aws_sdk_s3::Client {
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version_latest()
            .http_client(crate::s3::https_client())
            .endpoint_url(self.endpoint())
            .region(Region::new("us-east-1"))
            .credentials_provider(Self::credentials())
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    /// Creates `bucket`. Panics on failure.
    pub async fn make_bucket(&self, bucket: &str) {
        self.raw_client().create_bucket().bucket(bucket).send().await.unwrap();
    }

    /// Kills the server at once (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.kill();
    }
}
