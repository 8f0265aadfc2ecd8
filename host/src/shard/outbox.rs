//! Flushed points on their way to the sink.
//!
//! Shards put what they flush here; the sink task takes it out only once the
//! sink confirmed the write. Everything still here is part of every
//! checkpoint, so a point is durable from the moment its shard flushed it:
//! that is what lets the pipeline acknowledge messages at a checkpoint
//! without waiting for the sink.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::sink::Point;

/// Points waiting for the sink, in flush order.
#[derive(Debug, Default)]
pub struct Outbox {
    inner: Mutex<Inner>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct Inner {
    next_seq: u64,
    jobs: BTreeMap<u64, Arc<Vec<Point>>>,
    points: usize,
    flushes_in_flight: usize,
}

impl Inner {
    /// Adds a job of `points`; an empty list is ignored.
    fn add(&mut self, points: Vec<Point>) {
        if points.is_empty() {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.points += points.len();
        self.jobs.insert(seq, Arc::new(points));
    }
}

impl Outbox {
    /// An empty outbox.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves consistent data (every
        // operation is a single insert or remove), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds points for the sink; an empty list is ignored.
    pub fn push(&self, points: Vec<Point>) {
        if points.is_empty() {
            return;
        }
        self.lock().add(points);
        self.notify.notify_one();
    }

    /// Counts a flush about to be sent to a shard (counted before it is
    /// sent, as the shard may run it at once). Its size is unknown until the
    /// shard has run it, so the pipeline sends no further flush meanwhile:
    /// otherwise flushes queued behind a shard's backlog could each close
    /// more buckets and land together, far past `max_pending_points`.
    pub fn flush_sent(&self) {
        self.lock().flushes_in_flight += 1;
    }

    /// Adds the points of a flush announced by [`Outbox::flush_sent`]. The
    /// flush stops counting as in flight in the same step as its points
    /// start counting as pending, so no reader sees neither.
    pub fn flushed(&self, points: Vec<Point>) {
        {
            let mut inner = self.lock();
            inner.flushes_in_flight = inner.flushes_in_flight.saturating_sub(1);
            inner.add(points);
        }
        self.notify.notify_one();
    }

    /// Number of flushes sent to shards whose points have not arrived.
    pub fn flushes_in_flight(&self) -> usize {
        self.lock().flushes_in_flight
    }

    /// Jobs with a sequence number of at least `from`, oldest first.
    pub fn jobs_from(&self, from: u64) -> Vec<(u64, Arc<Vec<Point>>)> {
        self.lock()
            .jobs
            .range(from..)
            .map(|(s, j)| (*s, j.clone()))
            .collect()
    }

    /// Removes job `seq`: the sink confirmed it.
    pub fn confirm(&self, seq: u64) {
        let mut inner = self.lock();
        if let Some(job) = inner.jobs.remove(&seq) {
            inner.points -= job.len();
        }
    }

    /// Every job not yet confirmed, oldest first (for a checkpoint): shared,
    /// not copied.
    pub fn pending(&self) -> Vec<Arc<Vec<Point>>> {
        self.lock().jobs.values().cloned().collect()
    }

    /// Number of points not yet confirmed.
    pub fn pending_points(&self) -> usize {
        self.lock().points
    }

    /// Waits until something is pushed.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Wakes a waiting sink task (for shutdown).
    pub fn wake(&self) {
        self.notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::tests::point;

    #[test]
    fn a_flush_is_in_flight_until_its_points_arrive_even_none() {
        let outbox = Outbox::new();
        outbox.flush_sent();
        outbox.flush_sent();
        assert_eq!(
            (outbox.flushes_in_flight(), outbox.pending_points()),
            (2, 0)
        );
        // A flush that closed nothing still lands.
        outbox.flushed(Vec::new());
        assert_eq!(
            (outbox.flushes_in_flight(), outbox.pending_points()),
            (1, 0)
        );
        outbox.flushed(vec![point("m", 60, 1.0, &[]), point("m", 120, 2.0, &[])]);
        assert_eq!(
            (outbox.flushes_in_flight(), outbox.pending_points()),
            (0, 2)
        );
        // Restored points are not a flush.
        outbox.push(vec![point("m", 180, 3.0, &[])]);
        assert_eq!(
            (outbox.flushes_in_flight(), outbox.pending_points()),
            (0, 3)
        );
        let jobs = outbox.jobs_from(0);
        assert_eq!(jobs.len(), 2);
        outbox.confirm(jobs[0].0);
        assert_eq!(outbox.pending_points(), 1);
    }
}
