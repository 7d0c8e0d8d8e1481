//! What group commit has done: live counters and their snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::config::GroupCommitConfig;

/// Upper bounds (inclusive) of the batch-size buckets of
/// [`GroupCommitStats::batch_sizes`]: 1, 2-3, 4-7, ..., 512-1000.
pub const BATCH_SIZE_BUCKETS: [u64; 10] = [1, 3, 7, 15, 31, 63, 127, 255, 511, 1000];

/// One bucket of the batch-size distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BatchSizeBucket {
    /// Smallest batch size (events) in the bucket.
    pub min_events: u64,
    /// Largest batch size (events) in the bucket.
    pub max_events: u64,
    /// Committed batches of that size.
    pub batches: u64,
}

/// What group commit has done since the store was created (a snapshot).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupCommitStats {
    /// Whether appends go through group commit.
    pub enabled: bool,
    /// Whether the stream refused atomic batches, so appends go one by one.
    pub fallback_single: bool,
    /// Configured linger, in microseconds.
    pub linger_us: u64,
    /// Committed server writes (batches, including batches of one append):
    /// with `sync_interval: always`, one fsync each.
    pub batches: u64,
    /// Appends acknowledged as written (a retry found already stored is
    /// not counted again).
    pub appends: u64,
    /// Events acknowledged as written.
    pub events: u64,
    /// Largest committed batch, in events.
    pub max_batch_events: u64,
    /// Mean events per committed batch (0 when nothing was written).
    pub mean_batch_events: f64,
    /// fsyncs saved compared with one write per event: `events - batches`.
    pub fsyncs_saved: u64,
    /// Batch-size distribution (events per committed batch).
    pub batch_sizes: Vec<BatchSizeBucket>,
    /// Batches that waited for the linger.
    pub lingered_batches: u64,
    /// Lingers that ran out before the expected appends came (the load
    /// dropped, or writers were slow to come back).
    pub linger_expired: u64,
    /// Batches refused for a stale expectation and split.
    pub split_batches: u64,
    /// Appends found stale in a refused batch and answered with a conflict
    /// (or recognised as an earlier try that had landed).
    pub conflicts_resolved: u64,
    /// Appends of a refused batch that were innocent and went out again.
    pub requeued_appends: u64,
    /// Appends sent on their own because the batch path could not decide
    /// their outcome exactly (duplicate ids, unknown errors, no atomic
    /// publish on the stream).
    pub single_fallbacks: u64,
    /// Callers turned away with [`crate::Error::Overloaded`].
    pub queue_timeouts: u64,
    /// Appends queued or in flight at the time of the snapshot.
    pub outstanding_appends: u64,
}

/// Live counters behind [`GroupCommitStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    batches: AtomicU64,
    appends: AtomicU64,
    events: AtomicU64,
    max_batch: AtomicU64,
    buckets: [AtomicU64; BATCH_SIZE_BUCKETS.len()],
    lingered: AtomicU64,
    linger_expired: AtomicU64,
    split: AtomicU64,
    conflicts: AtomicU64,
    requeued: AtomicU64,
    singles: AtomicU64,
    queue_timeouts: AtomicU64,
    /// Appends accepted and not yet answered (queued or in flight).
    outstanding: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    /// One committed write of `appends` appends holding `events` events.
    pub(crate) fn committed(&self, appends: usize, events: usize) {
        let events = events as u64;
        add(&self.batches, 1);
        add(&self.appends, appends as u64);
        add(&self.events, events);
        self.max_batch.fetch_max(events, Ordering::Relaxed);
        add(&self.buckets[bucket_index(events)], 1);
    }

    /// A batch waited for the linger.
    pub(crate) fn batch_lingered(&self) {
        add(&self.lingered, 1);
    }

    /// A linger ran out before the expected appends came.
    pub(crate) fn linger_ran_out(&self) {
        add(&self.linger_expired, 1);
    }

    /// A batch was refused for a stale expectation and split.
    pub(crate) fn batch_split(&self) {
        add(&self.split, 1);
    }

    /// A stale append of a refused batch was answered.
    pub(crate) fn conflict_resolved(&self) {
        add(&self.conflicts, 1);
    }

    /// `n` innocent appends of a refused batch go out again.
    pub(crate) fn requeued(&self, n: usize) {
        add(&self.requeued, n as u64);
    }

    /// `n` appends go out on their own, the batch path unable to decide.
    pub(crate) fn single_fallbacks(&self, n: usize) {
        add(&self.singles, n as u64);
    }

    /// A caller was turned away with [`crate::Error::Overloaded`].
    pub(crate) fn queue_timed_out(&self) {
        add(&self.queue_timeouts, 1);
    }

    /// An append was accepted into the queue (outstanding until answered).
    pub(crate) fn accepted(&self) {
        add(&self.outstanding, 1);
    }

    /// An accepted append was answered (or handed back to its caller).
    pub(crate) fn answered(&self) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, config: &GroupCommitConfig, fallback: bool) -> GroupCommitStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut min = 1;
        let batch_sizes = BATCH_SIZE_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(&max, n)| {
                let b = BatchSizeBucket {
                    min_events: min,
                    max_events: max,
                    batches: get(n),
                };
                min = max + 1;
                b
            })
            .collect();
        let (batches, events) = (get(&self.batches), get(&self.events));
        GroupCommitStats {
            enabled: config.enabled,
            fallback_single: fallback,
            linger_us: u64::try_from(config.linger.as_micros()).unwrap_or(u64::MAX),
            batches,
            appends: get(&self.appends),
            events,
            max_batch_events: get(&self.max_batch),
            mean_batch_events: if batches == 0 {
                0.0
            } else {
                events as f64 / batches as f64
            },
            fsyncs_saved: events.saturating_sub(batches),
            batch_sizes,
            lingered_batches: get(&self.lingered),
            linger_expired: get(&self.linger_expired),
            split_batches: get(&self.split),
            conflicts_resolved: get(&self.conflicts),
            requeued_appends: get(&self.requeued),
            single_fallbacks: get(&self.singles),
            queue_timeouts: get(&self.queue_timeouts),
            outstanding_appends: get(&self.outstanding),
        }
    }
}

/// The bucket of [`BATCH_SIZE_BUCKETS`] a batch of `events` falls in.
pub(crate) fn bucket_index(events: u64) -> usize {
    BATCH_SIZE_BUCKETS
        .iter()
        .position(|&max| events <= max)
        .unwrap_or(BATCH_SIZE_BUCKETS.len() - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_size_buckets_cover_one_to_a_thousand() {
        assert_eq!(bucket_index(1), 0);
        assert_eq!(bucket_index(2), 1);
        assert_eq!(bucket_index(3), 1);
        assert_eq!(bucket_index(4), 2);
        assert_eq!(bucket_index(64), 6);
        assert_eq!(bucket_index(1000), 9);
        let c = Counters::default();
        c.committed(3, 5);
        c.committed(1, 1);
        let s = c.snapshot(&GroupCommitConfig::default(), false);
        assert_eq!(
            (s.batches, s.appends, s.events, s.fsyncs_saved),
            (2, 4, 6, 4)
        );
        assert_eq!(s.batch_sizes[0].batches, 1);
        assert_eq!(
            (
                s.batch_sizes[2].min_events,
                s.batch_sizes[2].max_events,
                s.batch_sizes[2].batches
            ),
            (4, 7, 1)
        );
        assert_eq!(s.max_batch_events, 5);
        assert_eq!(s.mean_batch_events, 3.0);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["fsyncs_saved"], 4);
        assert_eq!(json["batch_sizes"][0]["batches"], 1);
    }
}
