//! Bounds on the transfers in progress: upload and download slots, the
//! bytes uploads may hold, one transfer of each kind per node, and how
//! long a stream may stay silent or slow.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Status, Streaming};

use crate::config::LimitsConfig;

/// Bounds on transfers: how many update streams are read at once, how many
/// announced payload bytes they hold together, how many model streams are
/// sent at once, how long one waits for a slot, how long an update stream
/// may stay silent and how slow it may be, and one upload (and one fetch of
/// each model part) in flight per session.
#[derive(Debug, Clone)]
pub struct TransferLimits {
    uploads: Arc<Semaphore>,
    /// One permit per KiB of announced payload.
    kib: Arc<Semaphore>,
    max_kib: u64,
    downloads: Arc<Semaphore>,
    queue_timeout: Duration,
    download_slot_timeout: Duration,
    pub idle_timeout: Duration,
    /// Bytes per second an upload must average (0: no floor).
    min_upload_rate: u64,
    /// Sessions with an update stream being read.
    uploading: InFlightSet,
    /// Sessions and model parts being fetched.
    fetching: InFlightSet,
}

type InFlightSet = Arc<std::sync::Mutex<std::collections::HashSet<String>>>;

/// One transfer of a session in flight; dropping it ends it.
#[derive(Debug)]
pub struct InFlight {
    set: InFlightSet,
    key: String,
}

impl InFlight {
    /// Marks `key` in flight in `set`, unless it already is.
    fn claim(set: &InFlightSet, key: String) -> Option<Self> {
        let mut held = set.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        held.insert(key.clone()).then(|| Self { set: set.clone(), key })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// What an upload holds while it is read.
#[derive(Debug)]
pub struct UploadPermit {
    _slot: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

impl TransferLimits {
    pub fn new(c: &LimitsConfig) -> Self {
        let max_kib = c.max_inflight_bytes.div_ceil(1024).min(Semaphore::MAX_PERMITS as u64);
        Self {
            uploads: Arc::new(Semaphore::new(c.max_concurrent_uploads as usize)),
            kib: Arc::new(Semaphore::new(max_kib as usize)),
            max_kib,
            downloads: Arc::new(Semaphore::new(c.max_concurrent_downloads as usize)),
            queue_timeout: c.queue_timeout,
            download_slot_timeout: c.download_slot_timeout,
            idle_timeout: c.stream_idle_timeout,
            min_upload_rate: c.min_upload_bytes_per_sec,
            uploading: InFlightSet::default(),
            fetching: InFlightSet::default(),
        }
    }

    /// Claims the one upload node `node` may have in flight (by name: a
    /// rejoin under a new session does not buy another).
    pub(super) fn claim_upload(&self, node: &str, round: u64) -> Result<InFlight, Status> {
        InFlight::claim(&self.uploading, node.to_owned()).ok_or_else(|| {
            Status::already_exists(format!(
                "node {node} already has an update stream open for round {round}; a node sends one at a time"
            ))
        })
    }

    /// Claims the one fetch of model part `part` node `node` may have in flight.
    pub(super) fn claim_fetch(&self, node: &str, part: i32) -> Result<InFlight, Status> {
        InFlight::claim(&self.fetching, format!("{part}/{node}")).ok_or_else(|| {
            Status::already_exists(format!(
                "node {node} is already fetching this model part; a node fetches one copy at a time"
            ))
        })
    }

    /// When an upload of `payload_bytes` that starts now must be complete.
    pub(super) fn upload_deadline(&self, payload_bytes: u64) -> Option<tokio::time::Instant> {
        (self.min_upload_rate > 0).then(|| {
            let secs = payload_bytes as f64 / self.min_upload_rate as f64;
            tokio::time::Instant::now() + self.idle_timeout + Duration::from_secs_f64(secs.min(1e9))
        })
    }

    fn busy(&self, what: &str) -> Status {
        Status::resource_exhausted(format!(
            "the coordinator is serving as many {what} as its limits allow; none freed within {:?}, try again",
            self.queue_timeout
        ))
    }

    /// Waits (up to the queue timeout) until an upload of `payload_bytes`
    /// fits; refuses one that never could.
    pub async fn admit_upload(&self, payload_bytes: u64) -> Result<UploadPermit, Status> {
        let kib = payload_bytes.div_ceil(1024).max(1);
        if kib > self.max_kib || kib > u64::from(u32::MAX) {
            return Err(Status::resource_exhausted(format!(
                "an update of {payload_bytes} bytes exceeds limits.max_inflight_bytes ({} bytes)",
                self.max_kib * 1024
            )));
        }
        let wait = async {
            let slot = self.uploads.clone().acquire_owned().await;
            let bytes = self.kib.clone().acquire_many_owned(kib as u32).await;
            match (slot, bytes) {
                (Ok(s), Ok(b)) => Ok(UploadPermit { _slot: s, _bytes: b }),
                _ => Err(Status::unavailable("coordinator is shutting down")),
            }
        };
        tokio::time::timeout(self.queue_timeout, wait)
            .await
            .map_err(|_| self.busy("uploads"))?
    }

    /// Waits (up to the queue timeout) for a download slot. The slot goes
    /// back when the stream ends or after the slot timeout, whichever is
    /// first: HTTP/2 stops asking a stream for data while its client reads
    /// nothing, so a timer, not the stream, gives a stalled download's
    /// slot back (its node's one fetch stays claimed until the stream ends).
    pub async fn admit_download(&self) -> Result<DownloadSlot, Status> {
        let permit = tokio::time::timeout(self.queue_timeout, self.downloads.clone().acquire_owned())
            .await
            .map_err(|_| self.busy("downloads"))?
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        let slot = Arc::new(std::sync::Mutex::new(Some(permit)));
        let expiring = Arc::downgrade(&slot);
        let after = self.download_slot_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(slot) = expiring.upgrade() {
                slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            }
        });
        Ok(DownloadSlot { _held: slot })
    }

    /// The next message of an update stream, or an error if it stays silent
    /// longer than the idle timeout.
    pub async fn next<T>(&self, stream: &mut Streaming<T>) -> Result<Option<T>, Status> {
        self.next_before(stream, None).await
    }

    /// As [`TransferLimits::next`], and an error once `deadline` passes.
    pub(super) async fn next_before<T>(
        &self,
        stream: &mut Streaming<T>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Option<T>, Status> {
        let idle = tokio::time::Instant::now() + self.idle_timeout;
        let until = deadline.map_or(idle, |d| d.min(idle));
        match tokio::time::timeout_at(until, stream.message()).await {
            Ok(msg) => msg.map_err(broken_stream),
            Err(_) if until < idle => Err(Status::deadline_exceeded(format!(
                "update stream too slow: uploads must average at least {} bytes/s \
                 (limits.min_upload_bytes_per_sec) after {:?}; upload abandoned",
                self.min_upload_rate, self.idle_timeout
            ))),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "update stream sent nothing for {:?}; upload abandoned",
                self.idle_timeout
            ))),
        }
    }
}

/// A transport error while reading a stream (the client went away, the
/// connection broke) as `CANCELLED`, so it is counted as a broken stream;
/// a message that does not decode stays what it is.
fn broken_stream(s: Status) -> Status {
    if s.code() == tonic::Code::Internal && !s.message().contains("decode") {
        Status::cancelled(format!("the update stream broke: {}", s.message()))
    } else {
        s
    }
}

/// A download's slot, held by its model stream until the slot timeout.
#[derive(Debug)]
pub struct DownloadSlot {
    _held: Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>,
}
