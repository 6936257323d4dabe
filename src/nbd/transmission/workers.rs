//! The worker pool: the gate that bounds requests in flight and the buffer bytes they
//! hold, and the queue of jobs waiting for a worker thread.

use super::*;

/// Limits requests in flight and the buffer bytes they hold.
pub(super) struct Gate {
    pub(super) state: Mutex<(usize, u64)>,
    pub(super) freed: Condvar,
    pub(super) requests_max: usize,
    pub(super) bytes_max: u64,
}

impl Gate {
    pub(super) fn admits(&self, s: &(usize, u64), bytes: u64) -> bool {
        s.0 < self.requests_max && (s.0 == 0 || s.1.saturating_add(bytes) <= self.bytes_max)
    }

    /// Takes a place without waiting; false if it would have to wait.
    pub(super) fn try_acquire(&self, bytes: u64) -> bool {
        let mut s = self.state.lock();
        if !self.admits(&s, bytes) {
            return false;
        }
        s.0 += 1;
        s.1 = s.1.saturating_add(bytes);
        true
    }

    pub(super) fn acquire(&self, bytes: u64) {
        let mut s = self.state.lock();
        while !self.admits(&s, bytes) {
            self.freed.wait(&mut s);
        }
        s.0 += 1;
        s.1 = s.1.saturating_add(bytes);
    }

    /// Requests in flight.
    pub(super) fn in_flight(&self) -> usize {
        self.state.lock().0
    }

    pub(super) fn release(&self, bytes: u64) {
        let mut s = self.state.lock();
        s.0 = s.0.saturating_sub(1);
        s.1 = s.1.saturating_sub(bytes);
        self.freed.notify_all();
    }
}

#[derive(Default)]
pub(super) struct QueueState {
    pub(super) jobs: VecDeque<Job>,
    pub(super) closed: bool,
    pub(super) workers: usize,
    pub(super) idle: usize,
}

/// Jobs waiting for a worker.
pub(super) struct Queue {
    pub(super) state: Mutex<QueueState>,
    pub(super) ready: Condvar,
    pub(super) workers_max: usize,
}

impl Queue {
    /// Queues `job`; true if the caller should start another worker for it.
    pub(super) fn push(&self, job: Job) -> bool {
        let mut s = self.state.lock();
        s.jobs.push_back(job);
        self.ready.notify_one();
        if s.idle < s.jobs.len() && s.workers < self.workers_max {
            s.workers += 1;
            return true;
        }
        false
    }

    /// A worker that `push` asked for could not be started; returns the workers left.
    pub(super) fn worker_failed(&self) -> usize {
        let mut s = self.state.lock();
        s.workers = s.workers.saturating_sub(1);
        s.workers
    }

    pub(super) fn pop(&self) -> Option<Job> {
        let mut s = self.state.lock();
        loop {
            if let Some(job) = s.jobs.pop_front() {
                return Some(job);
            }
            if s.closed {
                return None;
            }
            s.idle += 1;
            self.ready.wait(&mut s);
            s.idle -= 1;
        }
    }

    pub(super) fn close(&self) {
        self.state.lock().closed = true;
        self.ready.notify_all();
    }
}
