//! Background fetches: the threads partial layers run read-ahead on, counted, stoppable and
//! joined by the engine context that owns them.
//!
//! Owns: starting a job on a thread of its own (unless stopping), counting the ones running,
//! and stopping: no new job starts, the running ones get a bounded time to finish and are then
//! joined. Does not own: what the jobs do (see `fetch`) or who owns this (see `context`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The background fetch threads of one engine context.
#[derive(Debug, Default)]
pub(crate) struct Background {
    /// Jobs started and not finished.
    running: AtomicUsize,
    /// Set by [`Background::stop`]: no new job starts.
    stopping: AtomicBool,
    /// The threads started and not joined yet (finished ones are joined as new ones start).
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Background {
    /// Runs `job` on a thread of its own; false (and `job` dropped unrun) when stopping or when
    /// no thread could be had.
    pub(crate) fn spawn(self: &Arc<Self>, job: impl FnOnce() + Send + 'static) -> bool {
        /// Uncounts its job when the job ends (also by a panic).
        struct Running(Arc<Background>);
        impl Drop for Running {
            fn drop(&mut self) {
                self.0.running.fetch_sub(1, Ordering::SeqCst);
            }
        }
        // Counted before the check, so that `stop` cannot miss it.
        self.running.fetch_add(1, Ordering::SeqCst);
        if self.stopping.load(Ordering::SeqCst) {
            self.running.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        let running = Running(self.clone());
        let spawned = std::thread::Builder::new().name("mcow-fetch".into()).spawn(move || {
            let _running = running;
            job();
        });
        match spawned {
            Ok(handle) => {
                let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
                threads.retain(|h| !h.is_finished());
                threads.push(handle);
                true
            }
            // The closure (and with it `running`) was dropped: the job is uncounted.
            Err(_) => false,
        }
    }

    /// Whether [`Background::stop`] was called.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Lets no new job start and waits up to `limit` for the running ones to finish, then joins
    /// their threads. Returns false (joining nothing) if some were still running after `limit`.
    pub(crate) fn stop(&self, limit: Duration) -> bool {
        self.stopping.store(true, Ordering::SeqCst);
        let start = Instant::now();
        while self.running.load(Ordering::SeqCst) > 0 {
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join(); // every job has ended: its thread is exiting
        }
        true
    }
}
