//! CPU time and memory of processes, from `/proc`: `utime + stime` of `/proc/PID/stat` (clock
//! ticks) and `VmRSS` / `VmHWM` of `/proc/PID/status`.

use std::collections::HashMap;

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// `(ppid, utime + stime)` of `pid`, if it exists.
fn stat(pid: i32) -> Option<(i32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: fields follow the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15), so indices shift by 3.
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// CPU ticks used so far by `pid` (0 if it is gone).
pub fn ticks(pid: i32) -> u64 {
    stat(pid).map_or(0, |(_, t)| t)
}

/// Every process whose parent is `ppid`.
pub fn children(ppid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![] };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| stat(pid).is_some_and(|(p, _)| p == ppid))
        .collect()
}

/// `VmRSS` and `VmHWM` of `pid`, MiB.
pub fn rss_mib(pid: i32) -> (f64, f64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Busy CPU ticks of the whole machine (`/proc/stat`: every state but idle and iowait).
fn machine_ticks() -> u64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else { return 0 };
    let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user)
    f.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum()
}

/// CPU ticks of the scheduler, of every process of our PostgreSQL server (the postmaster and its
/// children: backends, WAL writer, checkpointer, autovacuum ...) by pid, of the bench itself and
/// of the whole machine.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    scheduler: u64,
    postgres: HashMap<i32, u64>,
    bench: u64,
    machine: u64,
    at: Option<std::time::Instant>,
}

/// What was used between two snapshots, in CPU seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Used {
    /// The scheduler process.
    pub scheduler: f64,
    /// PostgreSQL, less the bench's own harness connections.
    pub postgres: f64,
    /// The bench process (the simulated fleet or the baseline's pollers).
    pub bench: f64,
    /// Everything else on the machine (other users' processes; also the harness's connections).
    pub other: f64,
    /// Wall seconds between the snapshots.
    pub wall: f64,
}

impl Snapshot {
    /// Now. `scheduler`: its pid (0: none running).
    pub fn take(scheduler: i32, postmaster: i32) -> Snapshot {
        let mut postgres: HashMap<i32, u64> = children(postmaster).into_iter().map(|p| (p, ticks(p))).collect();
        postgres.insert(postmaster, ticks(postmaster));
        Snapshot {
            scheduler: if scheduler > 0 { ticks(scheduler) } else { 0 },
            postgres,
            // SAFETY: getpid has no preconditions.
            bench: ticks(unsafe { libc::getpid() }),
            machine: machine_ticks(),
            at: Some(std::time::Instant::now()),
        }
    }

    /// What was used from `self` to `later`, leaving out the PostgreSQL backends in `exclude`
    /// (the harness's connections). A process that started in between counts from zero; one that
    /// ended in between is lost (the pools keep their connections, so that is rare).
    pub fn until(&self, later: &Snapshot, exclude: &[i32]) -> Used {
        let tck = clk_tck();
        let pg: u64 = later
            .postgres
            .iter()
            .filter(|(pid, _)| !exclude.contains(pid))
            .map(|(pid, t)| t.saturating_sub(self.postgres.get(pid).copied().unwrap_or(0)))
            .sum();
        let wall = match (self.at, later.at) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        };
        let scheduler = later.scheduler.saturating_sub(self.scheduler) as f64 / tck;
        let postgres = pg as f64 / tck;
        let bench = later.bench.saturating_sub(self.bench) as f64 / tck;
        let machine = later.machine.saturating_sub(self.machine) as f64 / tck;
        Used { scheduler, postgres, bench, other: (machine - scheduler - postgres - bench).max(0.0), wall }
    }
}

/// CPU ticks of the scheduler and PostgreSQL together, now.
pub fn busy_ticks(scheduler: i32, postmaster: i32) -> u64 {
    let pg: u64 = children(postmaster).into_iter().map(ticks).sum::<u64>() + ticks(postmaster);
    pg + if scheduler > 0 { ticks(scheduler) } else { 0 }
}
