//! The fleet benchmark's own PostgreSQL server, with production durability: `fsync`,
//! `synchronous_commit` and `full_page_writes` keep their defaults (on); only sizes are set
//! (connections, shared buffers, WAL size between checkpoints). The postmaster is a direct child
//! of the bench (started as user `postgres` when we are root), with a parent-death signal, so
//! it cannot outlive the bench even if the bench is killed; the [`Drop`] guard stops it and
//! deletes its data directory on every other exit path.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::Connection;

/// A running server and its data directory.
pub struct Postgres {
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    /// The loopback port it listens on.
    pub port: u16,
    /// `SELECT version()`, short.
    pub version: String,
}

/// The newest `/usr/lib/postgresql/*/bin`.
fn pg_bin() -> anyhow::Result<PathBuf> {
    let mut bins: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql: install PostgreSQL (Debian package `postgresql`)")?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
        .filter(|(_, p)| p.join("postgres").exists())
        .collect();
    bins.sort();
    bins.pop().map(|(_, p)| p).context("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
}

/// The uid and gid of user `postgres` when we are root (initdb refuses to run as root), else `None`.
fn run_as() -> anyhow::Result<Option<(libc::uid_t, libc::gid_t)>> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam returns NULL or a pointer to static storage, read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    anyhow::ensure!(!pw.is_null(), "running as root and there is no user `postgres` to run PostgreSQL as");
    // SAFETY: checked non-NULL above.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some((uid, gid)))
}

/// A command that runs as `user` (if set) and is killed when the thread that started it exits:
/// call it from the bench's main thread (the runtime's `block_on` thread lives as long as the bench).
fn command(program: &Path, user: Option<(libc::uid_t, libc::gid_t)>, cwd: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(cwd).stdin(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = user {
                if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // After setuid: a credential change clears the parent-death signal.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Postgres {
    /// initdb in a fresh temporary directory and start the server on a free loopback port.
    /// `settings`: extra `-c NAME=VALUE` (sizes only: the durability settings keep their defaults).
    pub async fn start(settings: &[(&str, String)]) -> anyhow::Result<Postgres> {
        let bin = pg_bin()?;
        let user = run_as()?;
        let dir = tempfile::Builder::new().prefix("proofmesh-fleet-pg.").tempdir_in("/tmp")?;
        let c = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).expect("no NUL");
        if let Some((uid, gid)) = user {
            // SAFETY: a valid path.
            anyhow::ensure!(unsafe { libc::chown(c.as_ptr(), uid, gid) } == 0, "chown {}: {}", dir.path().display(), std::io::Error::last_os_error());
        }
        // SAFETY: a valid path.
        unsafe { libc::chmod(c.as_ptr(), 0o700) };
        let data = dir.path().join("data");
        let log = dir.path().join("initdb.log");
        let out = command(&bin.join("initdb"), user, dir.path())
            .args(["-D", data.to_str().expect("utf-8"), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.path().join("initdb.err"))?)
            .status()
            .context("running initdb")?;
        anyhow::ensure!(out.success(), "initdb failed: {}", tail(&dir.path().join("initdb.err")));

        let mut pg = Postgres { child: None, dir: Some(dir), port: 0, version: String::new() };
        let dir = pg.dir.as_ref().expect("set").path().to_path_buf();
        for attempt in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let log = dir.join("server.log");
            let mut cmd = command(&bin.join("postgres"), user, &dir);
            cmd.args(["-D", data.to_str().expect("utf-8"), "-p", &port.to_string(), "-k", dir.to_str().expect("utf-8")])
                .args(["-c", "listen_addresses=127.0.0.1"]);
            for (name, value) in settings {
                cmd.args(["-c", &format!("{name}={value}")]);
            }
            let child = cmd.stdout(Stdio::null()).stderr(std::fs::File::create(&log)?).spawn().context("starting postgres")?;
            pg.child = Some(child);
            pg.port = port;
            let started = Instant::now();
            loop {
                if let Ok(mut c) = sqlx::postgres::PgConnection::connect(&pg.url("postgres")).await {
                    let v: String = sqlx::query_scalar("SELECT version()").fetch_one(&mut c).await?;
                    pg.version = v.split(" on ").next().unwrap_or(&v).to_string();
                    let _ = c.close().await;
                    return Ok(pg);
                }
                if let Some(status) = pg.child.as_mut().expect("set").try_wait()? {
                    pg.child = None;
                    if attempt == 4 {
                        anyhow::bail!("postgres exited ({status}): {}", tail(&log));
                    }
                    break; // port taken meanwhile: try another
                }
                anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "postgres did not accept connections within 60 s: {}", tail(&log));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        anyhow::bail!("postgres did not start")
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The postmaster's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Its data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.as_ref().map(|d| d.path().join("data")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut backends = vec![];
        if let Some(mut child) = self.child.take() {
            backends = crate::fleet::procstat::children(child.id() as i32);
            // Immediate shutdown: nothing here needs to survive, and a fast shutdown would
            // first write every dirty buffer out (a checkpoint of up to shared_buffers).
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGQUIT) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Backends notice the postmaster's death and exit; give them a moment before deleting
        // the directory under them.
        if let Some(dir) = self.dir.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && backends.iter().any(|p| Path::new(&format!("/proc/{p}")).exists()) {
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(dir);
        }
    }
}
