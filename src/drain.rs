//! Graceful drain: tell every connection to wind down, then wait until they all have.
//!
//! Each connection holds a [`Watch`]. [`Signal::drain`] flips the signal and completes once every `Watch`
//! is dropped, i.e. once every connection has finished.

use tokio::sync::{mpsc, watch};

/// Creates a drain signal and the first watch on it.
pub fn channel() -> (Signal, Watch) {
    let (tx, rx) = watch::channel(false);
    let (done_tx, done_rx) = mpsc::channel(1);
    (Signal { tx, done_rx }, Watch { rx, _done: done_tx })
}

/// Held by whoever decides when to drain.
#[derive(Debug)]
pub struct Signal {
    tx: watch::Sender<bool>,
    done_rx: mpsc::Receiver<()>,
}

impl Signal {
    /// Asks every watcher to drain and waits until all of them are gone.
    pub async fn drain(mut self) {
        let _ = self.tx.send(true);
        // `recv` returns `None` once every sender (one per `Watch`) is dropped.
        let _ = self.done_rx.recv().await;
    }
}

/// Held by every connection and accept loop; its drop tells the signal that one more is done.
#[derive(Clone, Debug)]
pub struct Watch {
    rx: watch::Receiver<bool>,
    _done: mpsc::Sender<()>,
}

impl Watch {
    /// Completes when draining starts.
    pub async fn signaled(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn drain_waits_for_every_watch() {
        let (signal, watch) = channel();
        let worker = watch.clone();
        drop(watch);
        let task = tokio::spawn(async move {
            worker.signaled().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(worker);
        });
        signal.drain().await;
        assert!(task.is_finished() || task.await.is_ok());
    }
}
