//! Liveness for container health checks: while the node runs, a task on its
//! runtime rewrites `state_dir/heartbeat` every few seconds; `edge-node
//! health` succeeds while that file is fresh. A node stuck in a dead runtime
//! stops writing and turns unhealthy; one waiting for its coordinator does not.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::{Error, Result};

/// The heartbeat file inside `state_dir`.
pub const HEARTBEAT_FILE: &str = "heartbeat";

/// How often the heartbeat is written.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// Writes `dir/heartbeat` now and then every [`HEARTBEAT_EVERY`] until the
/// returned task is aborted (dropping the guard aborts it).
pub fn spawn(dir: &Path) -> Result<HeartbeatGuard> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Config(format!("state_dir {}: {e}", dir.display())))?;
    let path = dir.join(HEARTBEAT_FILE);
    beat(&path)?;
    let task = tokio::spawn(async move {
        let mut every = tokio::time::interval(HEARTBEAT_EVERY);
        loop {
            every.tick().await;
            if let Err(e) = beat(&path) {
                tracing::warn!(error = %e, "heartbeat not written");
            }
        }
    });
    Ok(HeartbeatGuard(task))
}

/// Stops the heartbeat when dropped.
pub struct HeartbeatGuard(tokio::task::JoinHandle<()>);

impl Drop for HeartbeatGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn beat(path: &Path) -> Result<()> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    fedge_common::fsutil::write_atomic(path, format!("{now}\n").as_bytes())
        .map_err(|e| Error::Config(format!("writing the heartbeat {}: {e}", path.display())))
}

/// `edge-node health`: succeeds when `dir/heartbeat` was written less than
/// `max_age` ago; says how old it is either way.
pub fn check(dir: &Path, max_age: Duration) -> Result<Duration> {
    let path = dir.join(HEARTBEAT_FILE);
    let modified = std::fs::metadata(&path).and_then(|m| m.modified()).map_err(|e| {
        Error::Config(format!(
            "no heartbeat at {} ({e}); is the node running with this state_dir?",
            path.display()
        ))
    })?;
    let age = SystemTime::now().duration_since(modified).unwrap_or_default();
    if age > max_age {
        return Err(Error::Config(format!(
            "heartbeat {} is {:.0}s old (limit {:.0}s): the node is not making progress",
            path.display(),
            age.as_secs_f64(),
            max_age.as_secs_f64()
        )));
    }
    Ok(age)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fresh_while_running_stale_after() {
        let dir = tempfile::tempdir().unwrap();
        let e = check(dir.path(), Duration::from_secs(30)).unwrap_err().to_string();
        assert!(e.contains("no heartbeat at"), "{e}");
        let guard = spawn(dir.path()).unwrap();
        assert!(check(dir.path(), Duration::from_secs(30)).is_ok());
        drop(guard);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let e = check(dir.path(), Duration::from_secs(1)).unwrap_err().to_string();
        assert!(e.contains("the node is not making progress"), "{e}");
    }
}
