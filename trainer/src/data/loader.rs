//! Parallel preprocessing with a bounded queue and deterministic order.
//!
//! `num_workers` threads; worker w builds the batches w, w+k, w+2k, ... of the sequence it is
//! given and sends them through its own bounded channel; the consumer reads the channels
//! round-robin, so the output order does not depend on the worker count or on timing.
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Ordered parallel map over `jobs` with `workers` threads and `prefetch` results buffered
/// per worker. The training thread only receives finished items.
pub struct OrderedPool<T: Send + 'static> {
    receivers: Vec<Receiver<T>>,
    handles: Vec<JoinHandle<()>>,
    next: usize,
    total: usize,
}

impl<T: Send + 'static> OrderedPool<T> {
    pub fn new<J, F>(jobs: Vec<J>, workers: usize, prefetch: usize, f: F) -> Self
    where
        J: Send + Sync + 'static,
        F: Fn(&J) -> T + Send + Sync + 'static,
    {
        let workers = workers.max(1);
        let total = jobs.len();
        let jobs = Arc::new(jobs);
        let f = Arc::new(f);
        let mut receivers = Vec::new();
        let mut handles = Vec::new();
        for w in 0..workers {
            let (tx, rx) = sync_channel(prefetch.max(1));
            let jobs = Arc::clone(&jobs);
            let f = Arc::clone(&f);
            handles.push(std::thread::spawn(move || {
                let mut i = w;
                while i < jobs.len() {
                    if tx.send(f(&jobs[i])).is_err() {
                        return; // consumer dropped
                    }
                    i += workers;
                }
            }));
            receivers.push(rx);
        }
        Self {
            receivers,
            handles,
            next: 0,
            total,
        }
    }
}

impl<T: Send + 'static> Iterator for OrderedPool<T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        if self.next >= self.total {
            return None;
        }
        let k = self.receivers.len();
        let item = self.receivers[self.next % k].recv().ok()?;
        self.next += 1;
        Some(item)
    }
}

impl<T: Send + 'static> Drop for OrderedPool<T> {
    fn drop(&mut self) {
        self.receivers.clear(); // unblocks senders
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
