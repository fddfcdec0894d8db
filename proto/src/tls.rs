//! Mutual TLS for every gRPC connection of the cluster: rustls (ring) through tonic, client
//! certificates required and checked against a CA bundle, the peer's certificate subject as its
//! identity (`docs/security.md`).
//!
//! - [`TlsArgs`]: `--tls-cert`, `--tls-key`, `--tls-ca` (PEM files, all three or none) and
//!   `--tls-reload-secs`, the same on every binary. None given: plaintext, every client trusted
//!   (a development cluster on one trusted network); the binaries warn at start.
//! - Servers: [`incoming`] accepts TCP connections and, with TLS, completes each handshake in a
//!   task of its own (at most [`MAX_HANDSHAKES`] at once, each within [`HANDSHAKE_TIMEOUT`]), so a
//!   slow or plaintext client never holds up the others. A client without a certificate the CA
//!   signed, or speaking plaintext, never reaches a service. Every request carries the
//!   connection's [`PeerInfo`] (its [`PeerIdentity`]); read it with [`peer_identity`].
//! - Reload: a server re-reads the three files when their size or modification time changed,
//!   checked at most every `--tls-reload-secs` when a connection arrives (cert-manager rotates
//!   the files of a mounted secret in place). A file that does not parse leaves the previous
//!   configuration in use, with an error logged. Connections already open keep their session.
//! - Clients: [`TlsArgs::endpoint`] reads the files at each call (a reconnecting worker picks up
//!   a rotated certificate) and turns `http://` into `https://`: with TLS configured nothing is
//!   sent in plaintext.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// TLS handshakes in progress at once on one server; the accept loop waits for one to end
/// beyond that (connections queue in the kernel's backlog instead of in memory).
pub const MAX_HANDSHAKES: usize = 256;

/// Time a client has to complete its TLS handshake; it is disconnected after.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Only some of `--tls-cert`, `--tls-key`, `--tls-ca` were given.
    #[error("--tls-cert, --tls-key and --tls-ca go together; missing: {0}")]
    Incomplete(String),
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A file is not the PEM expected (no certificate, no private key, a bad CA certificate).
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the configuration (e.g. the key does not match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// tonic refused the client configuration or the URL.
    #[error("TLS client: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// TLS settings, the same flags on every binary (flatten into its clap arguments).
#[derive(Debug, Clone, Default, PartialEq, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain this process presents, as a server and as a client. Its subject is
    /// this process's identity (leases are bound to it; `--admin-subject` and
    /// `--operator-subject` match it). With `--tls-key` and `--tls-ca`.
    #[arg(long = "tls-cert", env = "PROOFMESH_TLS_CERT")]
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `--tls-cert`.
    #[arg(long = "tls-key", env = "PROOFMESH_TLS_KEY")]
    pub key: Option<PathBuf>,
    /// PEM CA bundle: servers accept only clients with a certificate it signed, clients only
    /// servers with one.
    #[arg(long = "tls-ca", env = "PROOFMESH_TLS_CA")]
    pub ca: Option<PathBuf>,
    /// Seconds between checks of the three files for changes (a server reloads them; clients
    /// read them at each connection).
    #[arg(long = "tls-reload-secs", env = "PROOFMESH_TLS_RELOAD_SECS", default_value_t = 30)]
    pub reload_secs: u64,
}

/// The three files of a TLS configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA bundle (PEM).
    pub ca: PathBuf,
}

impl TlsArgs {
    /// TLS with these files, reloaded every `reload_secs`.
    pub fn with_files(files: TlsFiles, reload_secs: u64) -> Self {
        TlsArgs { cert: Some(files.cert), key: Some(files.key), ca: Some(files.ca), reload_secs }
    }

    /// The files, `None` when TLS is off (none given). Errors: only some given.
    pub fn files(&self) -> Result<Option<TlsFiles>, TlsError> {
        match (&self.cert, &self.key, &self.ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles { cert: cert.clone(), key: key.clone(), ca: ca.clone() })),
            (cert, key, ca) => {
                let missing: Vec<&str> = [(cert.is_none(), "--tls-cert"), (key.is_none(), "--tls-key"), (ca.is_none(), "--tls-ca")]
                    .into_iter()
                    .filter_map(|(m, name)| m.then_some(name))
                    .collect();
                Err(TlsError::Incomplete(missing.join(", ")))
            }
        }
    }

    /// Whether TLS is configured.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }

    /// The server side: `None` with TLS off. Errors: incomplete flags, unreadable or bad files.
    pub fn server(&self) -> Result<Option<Arc<ServerTls>>, TlsError> {
        let Some(files) = self.files()? else { return Ok(None) };
        let stamp = stamp(&files);
        let acceptor = TlsAcceptor::from(server_config(&files)?);
        let every = Duration::from_secs(self.reload_secs);
        Ok(Some(Arc::new(ServerTls { files, every, state: Mutex::new(Reloadable { acceptor, stamp, checked: Instant::now() }) })))
    }

    /// A client endpoint for `url` (`http://` or `https://`). With TLS, the scheme becomes
    /// `https`, the server must present a certificate the CA signed for the URL's host, and this
    /// process presents its own; the files are read now. Errors: a bad URL, unreadable or bad files.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        self.endpoint_named(url, None)
    }

    /// [`TlsArgs::endpoint`], checking the server's certificate against `server_name` instead
    /// of the URL's host when given (provers advertise pod IPs; their certificates name a
    /// fixed DNS name). Errors: as `endpoint`.
    pub fn endpoint_named(&self, url: &str, server_name: Option<&str>) -> Result<Endpoint, TlsError> {
        let Some(files) = self.files()? else { return Ok(Endpoint::from_shared(url.to_string())?) };
        let url = match url.strip_prefix("http://") {
            Some(rest) => format!("https://{rest}"),
            None => url.to_string(),
        };
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&files.ca)?))
            .identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
        if let Some(name) = server_name {
            config = config.domain_name(name);
        }
        Ok(Endpoint::from_shared(url)?.tls_config(config)?)
    }

    /// The scheme this process's servers are reached by: `https` with TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.enabled() {
            "https"
        } else {
            "http"
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

fn pem_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Pem { path: path.to_path_buf(), reason: reason.to_string() }
}

/// A server configuration from `files`: the certificate and key presented, client certificates
/// required and verified against the CA bundle, ALPN `h2`.
fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&read(&files.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(&files.cert, e))?;
    if certs.is_empty() {
        return Err(pem_error(&files.cert, "no CERTIFICATE block"));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?).map_err(|e| pem_error(&files.key, e))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read(&files.ca)?) {
        roots.add(ca.map_err(|e| pem_error(&files.ca, e))?).map_err(|e| pem_error(&files.ca, e))?;
    }
    if roots.is_empty() {
        return Err(pem_error(&files.ca, "no CA certificate"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| pem_error(&files.ca, e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Size and modification time of each file (`None` for one that cannot be read).
fn stamp(files: &TlsFiles) -> Vec<Option<(u64, SystemTime)>> {
    [&files.cert, &files.key, &files.ca]
        .into_iter()
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.len(), m.modified().ok()?))))
        .collect()
}

/// A server's TLS configuration, reloaded when its files change (see the module docs).
#[derive(Debug)]
pub struct ServerTls {
    files: TlsFiles,
    every: Duration,
    state: Mutex<Reloadable>,
}

struct Reloadable {
    acceptor: TlsAcceptor,
    stamp: Vec<Option<(u64, SystemTime)>>,
    checked: Instant,
}

impl std::fmt::Debug for Reloadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloadable").field("stamp", &self.stamp).finish_non_exhaustive()
    }
}

impl ServerTls {
    /// The acceptor for a new connection, after reloading the files if they changed (checked at
    /// most every `--tls-reload-secs`).
    fn acceptor(&self) -> TlsAcceptor {
        let mut state = self.state.lock().expect("poisoned");
        if state.checked.elapsed() >= self.every {
            state.checked = Instant::now();
            let now = stamp(&self.files);
            if now != state.stamp {
                match server_config(&self.files) {
                    Ok(config) => {
                        state.acceptor = TlsAcceptor::from(config);
                        state.stamp = now;
                        tracing::info!(cert = %self.files.cert.display(), "TLS files changed: reloaded");
                    }
                    // Half-written files (a rotation in progress) are tried again at the next check.
                    Err(e) => tracing::error!("TLS files changed but do not load, keeping the previous ones: {e}"),
                }
            }
        }
        state.acceptor.clone()
    }
}

/// Who is at the other end of a connection: its certificate's subject (RFC 4514-like text, e.g.
/// `CN=prover-a, OU=workers, O=proofmesh`) and that subject's attributes, by short name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    subject: String,
    attributes: Vec<(String, String)>,
}

impl PeerIdentity {
    /// The identity in an X.509 certificate (DER). Errors: not a certificate, or a subject
    /// attribute that is not a string.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let registry = x509_parser::objects::oid_registry();
        let mut attributes = vec![];
        for attr in cert.subject().iter_attributes() {
            let name = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                .map(str::to_string)
                .unwrap_or_else(|_| attr.attr_type().to_id_string());
            let value = attr.as_str().map_err(|e| format!("subject attribute {name}: {e}"))?;
            attributes.push((name, value.to_string()));
        }
        let subject = attributes.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ");
        Ok(PeerIdentity { subject, attributes })
    }

    /// The subject, e.g. `CN=prover-a, OU=workers`.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Whether every attribute of `pattern` is among this subject's attributes.
    pub fn matches(&self, pattern: &SubjectPattern) -> bool {
        pattern.0.iter().all(|want| self.attributes.contains(want))
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.subject)
    }
}

/// A set of subject attributes a certificate must all have, written `KEY=VALUE[,KEY=VALUE...]`
/// with short names (`CN`, `OU`, `O`, ...): `CN=alice` is one person, `OU=proofmesh-admins` a
/// group. Used by the scheduler's `--admin-subject` and `--operator-subject`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectPattern(Vec<(String, String)>);

impl std::str::FromStr for SubjectPattern {
    type Err = String;

    /// Errors: empty, or a part without `=`, or an empty key.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut attrs = vec![];
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("{part:?} is not KEY=VALUE (e.g. CN=alice or OU=admins)"))?;
            if k.trim().is_empty() {
                return Err(format!("{part:?} has no attribute name"));
            }
            attrs.push((k.trim().to_string(), v.trim().to_string()));
        }
        if attrs.is_empty() {
            return Err("an empty subject pattern would match everyone".into());
        }
        Ok(SubjectPattern(attrs))
    }
}

impl std::fmt::Display for SubjectPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&parts.join(","))
    }
}

/// What a server knows about a connection; every request on it carries this (tonic's connect
/// info, in the request's extensions).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The client's address.
    pub remote_addr: Option<SocketAddr>,
    /// The client's certificate identity; `None` on a plaintext connection.
    pub identity: Option<Arc<PeerIdentity>>,
}

/// The certificate identity of the client that sent `request`: `None` when the server runs
/// without TLS (or was not served through [`incoming`]).
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<Arc<PeerIdentity>> {
    request.extensions().get::<PeerInfo>().and_then(|p| p.identity.clone())
}

/// One accepted connection, plaintext or TLS.
#[derive(Debug)]
pub struct PeerStream {
    io: Io,
    info: PeerInfo,
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections of `listener` for `Server::serve_with_incoming*`: plaintext with `tls` `None`,
/// else TLS with a client certificate, handshakes done concurrently (see the module docs). A
/// refused handshake is logged and dropped, never an error of the stream. Stops accepting when
/// the server drops the stream.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
) -> impl tokio_stream::Stream<Item = io::Result<PeerStream>> + Send + 'static {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &tls else {
                let info = PeerInfo { remote_addr: Some(addr), identity: None };
                if tx.send(Ok(PeerStream { io: Io::Plain(tcp), info })).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
            let (acceptor, tx) = (tls.acceptor(), tx.clone());
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return tracing::info!(peer = %addr, "TLS handshake refused: {e}"),
                    Err(_) => return tracing::info!(peer = %addr, "TLS handshake not completed within {HANDSHAKE_TIMEOUT:?}"),
                };
                drop(permit);
                let identity = match stream.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                    Some(der) => match PeerIdentity::from_der(der) {
                        Ok(id) => Some(Arc::new(id)),
                        Err(e) => return tracing::info!(peer = %addr, "client certificate refused: {e}"),
                    },
                    None => return tracing::info!(peer = %addr, "no client certificate"),
                };
                tracing::debug!(peer = %addr, identity = ?identity.as_ref().map(|i| i.subject()), "TLS connection");
                let info = PeerInfo { remote_addr: Some(addr), identity };
                let _ = tx.send(Ok(PeerStream { io: Io::Tls(Box::new(stream)), info })).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(feature = "test-ca")]
pub mod test_ca;
