//! Exponential backoff with jitter, for everything that waits on a peer that went away: workers
//! reconnecting to the scheduler, the gateway connecting, submitting and re-watching. Jitter
//! (each sleep is 50-100 % of the nominal delay) spreads a fleet's retries after a restart
//! ("full jitter" family, AWS Architecture Blog, "Exponential Backoff And Jitter", 2015).

use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

/// Nominal delays that double after each failure from `initial` up to `max`, and start over
/// after a success.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff whose first wait is `initial` (nominal), doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max, next: initial }
    }

    /// The nominal length of the next [`Backoff::wait`] (for log lines); the sleep is 50-100 % of it.
    pub fn delay(&self) -> Duration {
        self.next
    }

    /// Something worked: the next failure waits the shortest delay again.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// Sleeps the current delay (jittered) and doubles it. Returns `false` (at once) if
    /// `shutdown` was cancelled, so the caller can give up instead of retrying.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn delays_double_up_to_the_cap_jittered_and_reset() {
        let (initial, max) = (Duration::from_millis(250), Duration::from_secs(10));
        let token = CancellationToken::new();
        let mut b = Backoff::new(initial, max);
        let mut seen = Vec::new();
        for _ in 0..8 {
            let nominal = b.delay();
            seen.push(nominal);
            let start = tokio::time::Instant::now();
            assert!(b.wait(&token).await);
            let slept = start.elapsed();
            assert!(slept >= nominal / 2 && slept <= nominal + Duration::from_millis(1), "{slept:?} of {nominal:?}");
        }
        assert_eq!(seen[0], initial);
        assert_eq!(seen[1], initial * 2);
        assert_eq!(*seen.last().unwrap(), max);
        b.reset();
        assert_eq!(b.delay(), initial);
        token.cancel();
        assert!(!b.wait(&token).await);
    }
}
