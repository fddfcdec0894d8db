//! CPU time of jobs, for the compute seconds each job reports (the scheduler sums them per
//! batch; `make bench` divides batch wall time by them).
//!
//! plonky2 proves on a process-wide thread pool, so a job's CPU time cannot be read per thread.
//! Instead the process's CPU time (`getrusage(RUSAGE_SELF)`) is shared out: between two job
//! starts or ends the set of running jobs is fixed, and the CPU the process used in that interval
//! is split equally among them. The shares of all jobs add up to the CPU the process used while
//! it had work, so per-batch sums are exact; one job's share is exact when it runs alone.

use std::collections::HashMap;
use std::sync::Mutex;

/// User + system CPU seconds this process has used so far.
pub fn process_cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the struct we pass and reads nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

#[derive(Default)]
struct Meter {
    /// Process CPU seconds at the last settlement.
    last: f64,
    /// Running jobs and the CPU seconds attributed to each so far.
    jobs: HashMap<u64, f64>,
    next_id: u64,
}

impl Meter {
    /// Splits the CPU used since the last settlement among the running jobs.
    fn settle(&mut self) {
        let now = process_cpu_secs();
        let used = (now - self.last).max(0.0);
        self.last = now;
        if !self.jobs.is_empty() {
            let share = used / self.jobs.len() as f64;
            self.jobs.values_mut().for_each(|v| *v += share);
        }
    }
}

static METER: Mutex<Option<Meter>> = Mutex::new(None);

fn with_meter<T>(f: impl FnOnce(&mut Meter) -> T) -> T {
    let mut guard = METER.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(Meter::default))
}

/// Runs `f` as one job and returns its result with the CPU seconds attributed to it.
pub fn measured<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let id = with_meter(|m| {
        m.settle();
        m.next_id += 1;
        m.jobs.insert(m.next_id, 0.0);
        m.next_id
    });
    let out = f();
    let secs = with_meter(|m| {
        m.settle();
        m.jobs.remove(&id).unwrap_or(0.0)
    });
    (out, secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(secs: f64) {
        let start = process_cpu_secs();
        let mut x = 0u64;
        while process_cpu_secs() - start < secs {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    #[test]
    fn concurrent_jobs_share_the_process_cpu_without_counting_it_twice() {
        let before = process_cpu_secs();
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| measured(|| spin(0.3)).1);
            let b = s.spawn(|| measured(|| spin(0.3)).1);
            (a.join().unwrap(), b.join().unwrap())
        });
        let total = process_cpu_secs() - before;
        // Each job spun >= 0.3 s of process CPU, which includes the other's: the shares add up to
        // the process's CPU, not to twice it.
        assert!(a + b <= total + 0.02, "{a} + {b} > {total}");
        assert!(a + b >= 0.3, "{a} + {b}");
    }
}
