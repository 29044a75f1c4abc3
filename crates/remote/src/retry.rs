//! Bounded retries with exponential backoff, for transient failures only (network trouble,
//! 5xx, 429, short bodies). The caller sees an error only after the last attempt.

use std::time::{Duration, Instant};

use crate::error::Result;

/// How hard to try.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// Give up once this much time has passed since the first attempt.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            deadline: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Runs `op` until it succeeds, fails with a permanent error, or the policy is spent.
    pub fn run<T>(&self, what: &str, mut op: impl FnMut() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let mut delay = self.first_delay;
        let mut attempt = 1;
        loop {
            match op() {
                Ok(v) => return Ok(v),
                Err(e)
                    if e.is_transient()
                        && attempt < self.attempts
                        && start.elapsed() + delay < self.deadline =>
                {
                    tracing::warn!(what, attempt, error = %e, "transient failure, retrying in {delay:?}");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(self.max_delay);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RemoteError;

    fn transient() -> RemoteError {
        RemoteError::Transport { method: "GET", url: "u".into(), reason: "reset".into() }
    }

    #[test]
    fn retries_transient_errors_then_succeeds() {
        let p = RetryPolicy { first_delay: Duration::from_millis(1), ..RetryPolicy::default() };
        let mut n = 0;
        let v = p.run("t", || {
            n += 1;
            if n < 3 { Err(transient()) } else { Ok(n) }
        });
        assert_eq!(v.unwrap(), 3);
    }

    #[test]
    fn gives_up_after_the_bounded_attempts_and_never_retries_permanent_errors() {
        let p = RetryPolicy { first_delay: Duration::from_millis(1), attempts: 4, ..RetryPolicy::default() };
        let mut n = 0;
        assert!(
            p.run::<()>("t", || {
                n += 1;
                Err(transient())
            })
            .is_err()
        );
        assert_eq!(n, 4);
        let mut m = 0;
        assert!(
            p.run::<()>("t", || {
                m += 1;
                Err(RemoteError::Http { method: "GET", url: "u".into(), status: 404, body: String::new() })
            })
            .is_err()
        );
        assert_eq!(m, 1);
    }
}
