//! When the node is reachable (`[availability]`): devices come and go (a
//! phone charges at night, a camera sleeps), and a fleet on one machine
//! emulates that with a cycle of an online window and an offline window.
//! Offline, the node holds no session: it drops its connection and any
//! training in progress, and rejoins when the next online window opens.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// `[availability]`: a cycle of `online` then `offline`, entered `offset`
/// into it when the node starts. Both zero (the default): always online.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AvailabilityConfig {
    /// How long the node stays reachable in each cycle.
    #[serde(with = "humantime_serde")]
    pub online: Duration,
    /// How long it is away in each cycle.
    #[serde(with = "humantime_serde")]
    pub offline: Duration,
    /// Where in the cycle the node starts (nodes of one fleet can be staggered).
    #[serde(with = "humantime_serde")]
    pub offset: Duration,
}

/// Where the node stands in its cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Reachable for this much longer.
    Online(Duration),
    /// Away for this much longer.
    Offline(Duration),
}

impl AvailabilityConfig {
    /// Checks that the cycle is either off or has both windows.
    pub fn validate(&self) -> Result<()> {
        if self.online.is_zero() != self.offline.is_zero() {
            return Err(Error::Config(format!(
                "availability.online ({:?}) and availability.offline ({:?}) go together: set both, or neither \
                 (always online)",
                self.online, self.offline
            )));
        }
        Ok(())
    }

    /// Whether the node ever goes away.
    pub fn cycles(&self) -> bool {
        !self.online.is_zero()
    }

    /// The window the node is in `elapsed` after it started; `None` when it
    /// is always online.
    pub fn window(&self, elapsed: Duration) -> Option<Window> {
        if !self.cycles() {
            return None;
        }
        let cycle = (self.online + self.offline).as_nanos();
        let at = (elapsed + self.offset).as_nanos() % cycle;
        let nanos = |n: u128| Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX));
        Some(if at < self.online.as_nanos() {
            Window::Online(nanos(self.online.as_nanos() - at))
        } else {
            Window::Offline(nanos(cycle - at))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_cycle_alternates_its_windows_from_its_offset() {
        let a = AvailabilityConfig {
            online: secs(10),
            offline: secs(5),
            offset: secs(0),
        };
        assert_eq!(a.window(secs(0)), Some(Window::Online(secs(10))));
        assert_eq!(a.window(secs(9)), Some(Window::Online(secs(1))));
        assert_eq!(a.window(secs(10)), Some(Window::Offline(secs(5))));
        assert_eq!(a.window(secs(14)), Some(Window::Offline(secs(1))));
        assert_eq!(a.window(secs(15)), Some(Window::Online(secs(10))));
        assert_eq!(a.window(secs(47)), Some(Window::Online(secs(8))));
        let staggered = AvailabilityConfig { offset: secs(12), ..a };
        assert_eq!(staggered.window(secs(0)), Some(Window::Offline(secs(3))));
        assert_eq!(AvailabilityConfig::default().window(secs(7)), None);
    }

    #[test]
    fn half_a_cycle_is_refused_with_the_reason() {
        let e = AvailabilityConfig {
            online: secs(10),
            ..AvailabilityConfig::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("availability.online (10s) and availability.offline (0ns) go together"),
            "{e}"
        );
        assert!(AvailabilityConfig::default().validate().is_ok());
    }
}
