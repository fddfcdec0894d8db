//! Exponential backoff for everything that waits on the scheduler: connecting, submitting,
//! re-watching a batch after its stream broke.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// First delay after a failure.
const INITIAL: Duration = Duration::from_millis(250);
/// Longest delay: a scheduler that comes back is noticed within this.
const MAX: Duration = Duration::from_secs(10);

/// Delays that double after each failure, from 250 ms up to 10 s, and start over after a success.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    /// A backoff whose first wait is the shortest.
    pub(crate) fn new() -> Self {
        Backoff { next: INITIAL }
    }

    /// How long the next [`Backoff::wait`] sleeps (for log lines).
    pub(crate) fn delay(&self) -> Duration {
        self.next
    }

    /// Something worked: the next failure waits the shortest delay again.
    pub(crate) fn reset(&mut self) {
        self.next = INITIAL;
    }

    /// Sleeps the current delay and doubles it. Returns `false` (at once) if `shutdown` was
    /// cancelled, so the caller can give up instead of retrying.
    pub(crate) async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next;
        self.next = (self.next * 2).min(MAX);
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
    async fn delays_double_up_to_the_cap_and_reset() {
        let token = CancellationToken::new();
        let mut b = Backoff::new();
        let mut seen = Vec::new();
        for _ in 0..8 {
            seen.push(b.delay());
            assert!(b.wait(&token).await);
        }
        assert_eq!(seen[0], INITIAL);
        assert_eq!(seen[1], INITIAL * 2);
        assert_eq!(*seen.last().unwrap(), MAX);
        b.reset();
        assert_eq!(b.delay(), INITIAL);
        token.cancel();
        assert!(!b.wait(&token).await);
    }
}
