//! A named thread that owns libtorch state and takes messages from a
//! channel. Dropping the [`Worker`] closes the channel and waits for the
//! thread to finish its current message, so a process never exits while one
//! of its threads is inside libtorch (which crashes at exit).

use std::sync::mpsc;
use std::thread::JoinHandle;

/// The sending side of a worker thread; joins the thread when dropped.
pub struct Worker<M> {
    tx: Option<mpsc::Sender<M>>,
    thread: Option<JoinHandle<()>>,
}

impl<M: Send + 'static> Worker<M> {
    /// Starts thread `name` running `body` over the messages sent to it.
    pub fn spawn(name: &str, body: impl FnOnce(mpsc::Receiver<M>) + Send + 'static) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || body(rx))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands `msg` to the thread; gives it back if the thread has stopped.
    pub fn send(&self, msg: M) -> Result<(), M> {
        match &self.tx {
            Some(tx) => tx.send(msg).map_err(|e| e.0),
            None => Err(msg),
        }
    }
}

impl<M> std::fmt::Debug for Worker<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.thread.as_ref().and_then(|t| t.thread().name());
        f.debug_struct("Worker").field("thread", &name).finish()
    }
}

impl<M> Drop for Worker<M> {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn drop_waits_for_every_sent_message() {
        let done = Arc::new(AtomicU32::new(0));
        let seen = done.clone();
        let w = Worker::spawn("test", move |rx: mpsc::Receiver<u32>| {
            for m in rx {
                std::thread::sleep(std::time::Duration::from_millis(20));
                seen.fetch_add(m, Ordering::SeqCst);
            }
        })
        .unwrap();
        for m in 1..=3 {
            w.send(m).unwrap();
        }
        drop(w);
        assert_eq!(done.load(Ordering::SeqCst), 6);
    }
}
