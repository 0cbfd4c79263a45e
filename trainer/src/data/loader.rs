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
    /// Worker w's thread (taken when its panic is re-raised).
    handles: Vec<Option<JoinHandle<()>>>,
    next: usize,
    total: usize,
}

impl<T: Send + 'static> OrderedPool<T> {
    /// Err when a worker thread cannot be started (the OS's thread or memory limits); the
    /// workers already started stop at their first send.
    pub fn new<J, F>(jobs: Vec<J>, workers: usize, prefetch: usize, f: F) -> std::io::Result<Self>
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
            let worker = std::thread::Builder::new().spawn(move || {
                let mut i = w;
                while i < jobs.len() {
                    if tx.send(f(&jobs[i])).is_err() {
                        return; // consumer dropped
                    }
                    i += workers;
                }
            })?;
            handles.push(Some(worker));
            receivers.push(rx);
        }
        Ok(Self {
            receivers,
            handles,
            next: 0,
            total,
        })
    }
}

impl<T: Send + 'static> Iterator for OrderedPool<T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        if self.next >= self.total {
            return None;
        }
        let w = self.next % self.receivers.len();
        match self.receivers[w].recv() {
            Ok(item) => {
                self.next += 1;
                Some(item)
            }
            // The worker stopped before its last job: its function panicked. The panic goes on
            // here, on the consumer's thread (ending the sequence early instead ended a training
            // epoch silently, and at world > 1 left the other ranks waiting in a collective).
            Err(_) => match self.handles[w].take().map(JoinHandle::join) {
                Some(Err(panic)) => std::panic::resume_unwind(panic),
                _ => panic!("data loader worker {w} stopped before its last item"),
            },
        }
    }
}

impl<T: Send + 'static> Drop for OrderedPool<T> {
    fn drop(&mut self) {
        self.receivers.clear(); // unblocks senders
        for h in self.handles.drain(..).flatten() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_panic_reaches_the_consumer() {
        for workers in [1, 2] {
            let result = std::panic::catch_unwind(|| {
                let pool = OrderedPool::new((0..10).collect(), workers, 2, |&i: &i32| {
                    assert!(i != 3, "job 3 failed");
                    i
                })
                .unwrap();
                pool.collect::<Vec<_>>()
            });
            let panic = result.expect_err("the sequence must not just end early");
            let msg = crate::logging::panic_message(panic.as_ref());
            assert!(msg.contains("job 3 failed"), "{msg}");
        }
    }
}
