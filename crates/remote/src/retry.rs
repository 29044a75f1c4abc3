//! How long remote operations may take: retries with jittered exponential backoff for
//! transient failures only (network trouble, 5xx, 429, short bodies, transfers abandoned as too
//! slow), under one budget of time; the pace a response body must keep ([`Pace`]); and
//! [`Cancel`], the flag a client's owner sets to end its operations at once (at the end of a
//! process). The caller sees an error only once the budget is spent (or at once when cancelled).

use std::io::Read;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{RemoteError, Result};

/// How hard to try: transient failures are retried, with a backoff of `first_delay` doubling
/// up to `max_delay` (each delay drawn between half of it and all of it, so that clients that
/// failed together do not come back together), until `deadline` has passed since the
/// operation's first attempt (plus the time its size takes at the minimum rate, for transfers;
/// see [`RetryPolicy::run`]). The last delay is shortened so that the last attempt starts at the
/// end of the budget: an origin that comes back within it is found.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// No attempt starts once this much time has passed since the first attempt.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            deadline: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Runs `op` until it succeeds, fails with a permanent error, the budget (`deadline` plus
    /// `extra`) is spent, or `cancel` is set. A server's `Retry-After` (carried by the error)
    /// stands in for the backoff when it is longer, within the budget.
    /// Each retry (each attempt after the first) is counted in `retries`.
    pub fn run<T>(
        &self,
        what: &str,
        extra: Duration,
        cancel: &Cancel,
        retries: &std::sync::atomic::AtomicU64,
        mut op: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        let start = Instant::now();
        let budget = self.deadline + extra;
        let mut delay = self.first_delay;
        let mut attempt = 1u32;
        loop {
            if cancel.is_cancelled() {
                return Err(RemoteError::Cancelled(what.to_string()));
            }
            let e = match op() {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if cancel.is_cancelled() {
                return Err(RemoteError::Cancelled(what.to_string()));
            }
            let left = budget.saturating_sub(start.elapsed());
            if !e.is_transient() || left.is_zero() {
                return Err(e);
            }
            let wait = jitter(delay).max(e.retry_after().unwrap_or_default()).min(left);
            tracing::warn!(what, attempt, error = %e, "transient failure, retrying in {wait:?}");
            if cancel.wait(wait) {
                return Err(RemoteError::Cancelled(what.to_string()));
            }
            delay = (delay * 2).min(self.max_delay);
            attempt += 1;
            retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A delay between half of `d` and `d`, drawn afresh each time.
fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // A fresh `RandomState` is randomly keyed: its hash of nothing is a random number.
    let r = std::collections::hash_map::RandomState::new().build_hasher().finish();
    let half = d / 2;
    half + Duration::from_nanos(r % (half.as_nanos() as u64 + 1))
}

/// Set once by the owner of a client to end its operations: a retry waiting for its next
/// attempt returns at once, and a body being read stops at its next read (the client also
/// closes its connections, which interrupts reads blocked on them). Clones share the flag.
#[derive(Clone, Default)]
pub struct Cancel(Arc<(Mutex<bool>, Condvar)>);

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cancel({})", self.is_cancelled())
    }
}

impl Cancel {
    pub fn cancel(&self) {
        *self.0.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.0.1.notify_all();
    }

    pub fn is_cancelled(&self) -> bool {
        *self.0.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps for `d` or until cancelled; true if cancelled.
    pub fn wait(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        let mut set = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        while !*set {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            set = self.0.1.wait_timeout(set, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }
}

/// The pace a response body must keep: after a `grace` period, at least `min_rate` bytes per
/// second on average since the body began. So `n` bytes take at most `grace + n / min_rate`; a
/// body that falls behind is abandoned (a transient failure, so what is missing is asked for
/// again) as soon as that shows, without waiting for the whole allowance. A `min_rate` of 0
/// means no pace (only the per-read stall timeout bounds a transfer).
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub grace: Duration,
    pub min_rate: u64,
}

impl Pace {
    /// The time `len` bytes are allowed at the minimum rate (without the grace).
    pub fn allowance(&self, len: u64) -> Duration {
        if self.min_rate == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(len as f64 / self.min_rate as f64).min(Duration::from_secs(1 << 32))
    }
}

/// Why a paced body stopped early: carried inside the `std::io::Error` its reader returns, and
/// turned into the right [`RemoteError`] by [`abandoned`].
#[derive(Debug, thiserror::Error)]
pub enum Abandoned {
    #[error(
        "too slow: {got} bytes in {elapsed:?}, below the minimum of {min_rate} bytes/s (after {grace:?})"
    )]
    TooSlow { got: u64, elapsed: Duration, min_rate: u64, grace: Duration },
    #[error("cancelled")]
    Cancelled,
}

/// A body reader held to a [`Pace`] and a [`Cancel`]: checked at every read (each read is
/// bounded by the client's per-read timeout).
pub struct Paced<R> {
    inner: R,
    pace: Pace,
    cancel: Cancel,
    start: Instant,
    got: u64,
}

impl<R: Read> Paced<R> {
    pub fn new(inner: R, pace: Pace, cancel: Cancel) -> Paced<R> {
        Paced { inner, pace, cancel, start: Instant::now(), got: 0 }
    }

    fn check(&self) -> std::io::Result<()> {
        if self.cancel.is_cancelled() {
            return Err(std::io::Error::other(Abandoned::Cancelled));
        }
        let elapsed = self.start.elapsed();
        if self.pace.min_rate > 0
            && elapsed > self.pace.grace
            && (self.got as f64) < (elapsed - self.pace.grace).as_secs_f64() * self.pace.min_rate as f64
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                Abandoned::TooSlow {
                    got: self.got,
                    elapsed,
                    min_rate: self.pace.min_rate,
                    grace: self.pace.grace,
                },
            ));
        }
        Ok(())
    }
}

impl<R: Read> Read for Paced<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.check()?;
        let n = match self.inner.read(buf) {
            Ok(n) => n,
            // A read interrupted by the cancel (the client closed its connections) says so.
            Err(_) if self.cancel.is_cancelled() => return Err(std::io::Error::other(Abandoned::Cancelled)),
            Err(e) => return Err(e),
        };
        // Judged before each read only: bytes that arrived are never thrown away.
        self.got += n as u64;
        Ok(n)
    }
}

/// The error for a body read that failed with `e`: cancelled reads are [`RemoteError::Cancelled`]
/// (permanent), everything else (too slow, a cut connection, a stall) is transient.
pub fn abandoned(method: &'static str, url: &str, e: std::io::Error) -> RemoteError {
    match e.get_ref().and_then(|r| r.downcast_ref::<Abandoned>()) {
        Some(Abandoned::Cancelled) => RemoteError::Cancelled(format!("{method} {url}")),
        _ => {
            RemoteError::Transport { method, url: url.to_string(), reason: format!("reading the body: {e}") }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transient() -> RemoteError {
        RemoteError::Transport { method: "GET", url: "u".into(), reason: "reset".into() }
    }

    fn quick(deadline_ms: u64) -> RetryPolicy {
        RetryPolicy {
            first_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(20),
            deadline: Duration::from_millis(deadline_ms),
        }
    }

    #[test]
    fn retries_transient_errors_then_succeeds() {
        let mut n = 0;
        let retries = std::sync::atomic::AtomicU64::new(0);
        let v = quick(5000).run("t", Duration::ZERO, &Cancel::default(), &retries, || {
            n += 1;
            if n < 3 { Err(transient()) } else { Ok(n) }
        });
        assert_eq!(v.unwrap(), 3);
        assert_eq!(retries.into_inner(), 2, "two retries counted");
    }

    #[test]
    fn retries_for_the_whole_budget_and_never_retries_permanent_errors() {
        // Tried: an operation that always fails transiently, under a 300 ms budget (+100 ms
        // extra). Must hold: it is retried until the budget is spent, not before, and not
        // much after; a permanent error is not retried at all.
        let start = Instant::now();
        let mut n = 0;
        let e = quick(300)
            .run::<()>("t", Duration::from_millis(100), &Cancel::default(), &Default::default(), || {
                n += 1;
                Err(transient())
            })
            .unwrap_err();
        let took = start.elapsed();
        assert!(e.is_transient(), "{e}");
        assert!(took >= Duration::from_millis(400) && took < Duration::from_millis(900), "{took:?}");
        assert!(n > 10, "only {n} attempts");
        let mut m = 0;
        let e = quick(300)
            .run::<()>("t", Duration::ZERO, &Cancel::default(), &Default::default(), || {
                m += 1;
                Err(RemoteError::Http {
                    method: "GET",
                    url: "u".into(),
                    status: 404,
                    body: String::new(),
                    retry_after: None,
                })
            })
            .unwrap_err();
        assert!(!e.is_transient());
        assert_eq!(m, 1);
    }

    #[test]
    fn cancel_ends_a_retry_wait_at_once() {
        // Tried: a 10 s backoff, cancelled from another thread after 50 ms. Must hold: the
        // operation returns `Cancelled` within a moment, not after the backoff.
        let p = RetryPolicy {
            first_delay: Duration::from_secs(10),
            max_delay: Duration::from_secs(10),
            deadline: Duration::from_secs(60),
        };
        let cancel = Cancel::default();
        let c = cancel.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            c.cancel();
        });
        let start = Instant::now();
        let e =
            p.run::<()>("t", Duration::ZERO, &cancel, &Default::default(), || Err(transient())).unwrap_err();
        t.join().unwrap();
        assert!(matches!(e, RemoteError::Cancelled(_)), "{e}");
        assert!(!e.is_transient());
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    }

    #[test]
    fn jitter_stays_within_half_and_whole() {
        let d = Duration::from_millis(100);
        for _ in 0..100 {
            let j = jitter(d);
            assert!(j >= d / 2 && j <= d, "{j:?}");
        }
    }

    #[test]
    fn a_paced_reader_abandons_a_trickle_but_not_a_fast_body() {
        // A reader that gives one byte per 10 ms, held to 1000 bytes/s after 50 ms: abandoned
        // soon after the grace, as too slow (a transient error).
        struct Trickle;
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                std::thread::sleep(Duration::from_millis(10));
                buf[0] = 1;
                Ok(1)
            }
        }
        let pace = Pace { grace: Duration::from_millis(50), min_rate: 1000 };
        let mut r = Paced::new(Trickle, pace, Cancel::default());
        let start = Instant::now();
        let e = std::io::copy(&mut r, &mut std::io::sink()).unwrap_err();
        assert!(start.elapsed() < Duration::from_millis(500), "{:?}", start.elapsed());
        let e = abandoned("GET", "u", e);
        assert!(e.is_transient() && e.to_string().contains("too slow"), "{e}");
        // A fast body passes, whatever its length.
        let fast = vec![7u8; 1 << 20];
        let mut r = Paced::new(&fast[..], pace, Cancel::default());
        assert_eq!(std::io::copy(&mut r, &mut std::io::sink()).unwrap(), 1 << 20);
        // A cancelled one stops at its next read, permanently.
        let cancel = Cancel::default();
        cancel.cancel();
        let mut r = Paced::new(Trickle, pace, cancel);
        let e = abandoned("GET", "u", std::io::copy(&mut r, &mut std::io::sink()).unwrap_err());
        assert!(matches!(e, RemoteError::Cancelled(_)), "{e}");
    }
}
