//! CPU time of this process, for the compute seconds each job reports (the scheduler sums them
//! per batch; `make bench` divides batch wall time by them).

/// User + system CPU seconds this process has used so far (`getrusage(RUSAGE_SELF)`). A job's
/// compute time is the difference across its executor; exact when the process runs one job at a
/// time (capacity 1), an over-estimate otherwise.
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

/// Runs `f` and returns its result with the CPU seconds the process spent meanwhile.
pub fn measured<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = process_cpu_secs();
    let out = f();
    (out, (process_cpu_secs() - start).max(0.0))
}
