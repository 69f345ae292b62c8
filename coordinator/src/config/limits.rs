//! `[limits]`: bounds on what one node or stream may hold of the
//! coordinator (streams, bytes, time, memory).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Bounds on uploads, so that slow, stalled or hostile clients cannot hold
/// up others or grow the coordinator's memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Update streams read at once; further uploads wait for a slot.
    pub max_concurrent_uploads: u32,
    /// Announced payload bytes of the updates being read at once; an upload
    /// waits until its bytes fit, and one larger than this is refused.
    pub max_inflight_bytes: u64,
    /// Model downloads streamed at once; more wait for a slot.
    pub max_concurrent_downloads: u32,
    /// How long an upload or download may wait for a slot before it is
    /// refused (`RESOURCE_EXHAUSTED`; the node retries).
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// A download holds its slot at most this long: a client that stops
    /// reading cannot keep others waiting (its node still has no second
    /// download while the stream is open).
    #[serde(with = "humantime_serde")]
    pub download_slot_timeout: Duration,
    /// An update stream that sends nothing for this long is dropped.
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// An update stream must deliver its payload at least this fast on
    /// average (after a grace of `stream_idle_timeout`), or it is dropped:
    /// a trickle cannot hold an upload slot for ever (0: no floor).
    pub min_upload_bytes_per_sec: u64,
    /// Largest gRPC message (one chunk) the coordinator accepts, in bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_streams_per_connection: u32,
    /// HTTP/2 receive window per stream, in bytes: what one client may have
    /// in flight towards the coordinator before it is read. An upload
    /// waiting for a slot holds up to this much; larger windows move data
    /// faster over long links.
    pub stream_window_bytes: u32,
    /// Memory that received updates waiting to be folded (or, for robust
    /// aggregators, to be aggregated) may hold together; beyond it they
    /// are spooled to `out_dir/spool/`.
    pub spool_memory_bytes: u64,
    /// Global models up to this size stay in memory while a round runs;
    /// larger ones are read back from their checkpoint file (fetches stream
    /// from it, the aggregation reads it a block at a time), so the round's
    /// running sum is the only model-sized buffer. Simulations keep the
    /// model in memory, where their virtual nodes read it.
    pub resident_model_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_concurrent_uploads: 64,
            max_inflight_bytes: 8 << 30,
            max_concurrent_downloads: 64,
            queue_timeout: Duration::from_secs(300),
            download_slot_timeout: Duration::from_secs(120),
            stream_idle_timeout: Duration::from_secs(60),
            min_upload_bytes_per_sec: 4096,
            max_message_bytes: 4 << 20,
            max_streams_per_connection: 16,
            stream_window_bytes: 1 << 20,
            spool_memory_bytes: 256 << 20,
            resident_model_bytes: 64 << 20,
        }
    }
}

impl LimitsConfig {
    pub(super) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("limits: {m}")));
        if self.max_concurrent_uploads == 0 {
            return bad("max_concurrent_uploads must be at least 1".into());
        }
        if self.max_inflight_bytes == 0 {
            return bad("max_inflight_bytes must be at least 1".into());
        }
        if self.max_concurrent_downloads == 0 {
            return bad("max_concurrent_downloads must be at least 1".into());
        }
        if self.stream_idle_timeout.is_zero() || self.queue_timeout.is_zero() || self.download_slot_timeout.is_zero() {
            return bad("stream_idle_timeout, queue_timeout and download_slot_timeout must be longer than zero".into());
        }
        if !(65_535..=(1 << 30)).contains(&self.stream_window_bytes) {
            return bad(format!(
                "stream_window_bytes must be between 65535 and 1 GiB, got {}",
                self.stream_window_bytes
            ));
        }
        if self.max_streams_per_connection < 4 {
            return bad("max_streams_per_connection must be at least 4 (a node holds up to 3 streams)".into());
        }
        Ok(())
    }
}
