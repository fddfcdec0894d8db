//! The processes a test starts (the tests that run the cluster as separate processes): every
//! one is killed when the [`Procs`] holding it is dropped, so a failing test (a panic) leaves
//! nothing running; [`Procs::wait_listening`] checks that the process started is the one that
//! listens on its port (a port from [`free_port`] can be taken by another process before it binds
//! it), and fails at once if that process exited instead.

#![allow(dead_code)]

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Processes by name; killed (and reaped) when dropped.
#[derive(Default)]
pub struct Procs(Vec<(String, Child)>);

impl Procs {
    /// Holds `child` as `name`.
    pub fn add(&mut self, name: &str, child: Child) -> &mut Child {
        self.0.push((name.to_string(), child));
        &mut self.0.last_mut().unwrap().1
    }

    /// The process started as `name` (the latest, if several were).
    pub fn get(&mut self, name: &str) -> &mut Child {
        let at = self.0.iter().rposition(|(n, _)| n == name).unwrap_or_else(|| panic!("no process {name}"));
        &mut self.0[at].1
    }

    /// Takes process `name` out (it is not killed at the drop any more), e.g. to wait for its output.
    pub fn take(&mut self, name: &str) -> Child {
        let at = self.0.iter().rposition(|(n, _)| n == name).unwrap_or_else(|| panic!("no process {name}"));
        self.0.remove(at).1
    }

    /// Waits for process `name` to exit and lets it go.
    pub fn wait(&mut self, name: &str) -> ExitStatus {
        let status = self.get(name).wait().unwrap();
        self.take(name);
        status
    }

    /// The processes held, by name.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Child)> {
        self.0.iter_mut().map(|(n, c)| (n.as_str(), c))
    }

    /// Waits (up to 60 s) until process `name` itself listens on `port`. `Err` says why not: it
    /// exited (with its status), or it does not listen there (and what does).
    pub fn wait_listening(&mut self, name: &str, port: u16) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let child = self.get(name);
        let pid = child.id();
        loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("{name} (PID {pid}) exited ({status}) before listening on port {port}"));
            }
            if holds(pid, &listening_inodes(port)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{name} (PID {pid}) does not listen on port {port} after 60 s; the port is held by {}", holders(port)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
        }
        for (_, c) in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// A port nothing listens on now (the kernel's pick).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The inodes of the sockets listening on TCP `port`, any address, IPv4 or IPv6 (Linux's
/// `/proc/net/tcp*`: local address `HEX_IP:HEX_PORT`, state `0A` is LISTEN, inode in column 10).
fn listening_inodes(port: u16) -> Vec<u64> {
    let mut out = vec![];
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1).and_then(|a| a.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
            if f.len() > 9 && f[3] == "0A" && local_port == Some(port) {
                out.extend(f[9].parse::<u64>().ok());
            }
        }
    }
    out
}

/// The socket inodes process `pid` holds.
fn socket_inodes(pid: &str) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return vec![] };
    fds.flatten()
        .filter_map(|fd| {
            let link = std::fs::read_link(fd.path()).ok()?;
            link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

fn holds(pid: u32, inodes: &[u64]) -> bool {
    !inodes.is_empty() && socket_inodes(&pid.to_string()).iter().any(|i| inodes.contains(i))
}

/// What listens on `port`, for a message: "PID n (name)", or why that cannot be said.
fn holders(port: u16) -> String {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return "nothing".into();
    }
    let mut found = vec![];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = e.file_name().to_string_lossy().to_string();
        if pid.bytes().all(|b| b.is_ascii_digit()) && socket_inodes(&pid).iter().any(|i| inodes.contains(i)) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            found.push(format!("PID {pid} ({})", comm.trim()));
        }
    }
    if found.is_empty() {
        "a process this user cannot see".into()
    } else {
        found.join(", ")
    }
}
