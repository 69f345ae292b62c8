//! Refusal logs that a flood cannot turn into a flood of lines. Per kind of
//! refusal, the first [`BURST`] of every [`WINDOW`] are logged; the rest are
//! counted, and the count is logged in one line once the window is over
//! (at the next refusal of any kind). Every refusal still counts in the
//! metrics and in `run.json`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Refusals of one kind logged per window.
const BURST: u32 = 20;
/// How long a window lasts.
const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct LogGate {
    kinds: Mutex<HashMap<&'static str, Window>>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    logged: u32,
    quiet: u64,
}

impl LogGate {
    /// Whether to log this refusal of `kind`.
    pub fn allow(&self, kind: &'static str) -> bool {
        self.allow_at(kind, Instant::now())
    }

    fn allow_at(&self, kind: &'static str, now: Instant) -> bool {
        let mut kinds = self.kinds.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (what, w) in kinds.iter_mut() {
            if now.duration_since(w.started) >= WINDOW {
                if w.quiet > 0 {
                    tracing::warn!(
                        what,
                        not_logged = w.quiet,
                        seconds = now.duration_since(w.started).as_secs(),
                        "more refusals than the log shows"
                    );
                }
                *w = Window::new(now);
            }
        }
        let w = kinds.entry(kind).or_insert_with(|| Window::new(now));
        if w.logged < BURST {
            w.logged += 1;
            true
        } else {
            w.quiet += 1;
            false
        }
    }
}

impl Window {
    fn new(started: Instant) -> Self {
        Self {
            started,
            logged: 0,
            quiet: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_kind_and_window_is_logged_and_the_rest_counted() {
        let gate = LogGate::default();
        let t0 = Instant::now();
        let logged = (0..1000).filter(|_| gate.allow_at("join refused", t0)).count();
        assert_eq!(logged, BURST as usize);
        assert!(gate.allow_at("update refused", t0), "another kind has its own burst");
        let later = t0 + WINDOW;
        assert!(gate.allow_at("join refused", later), "a new window logs again");
        let kinds = gate.kinds.lock().unwrap();
        assert_eq!((kinds["join refused"].logged, kinds["join refused"].quiet), (1, 0));
    }
}
