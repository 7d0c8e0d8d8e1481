//! The store's settings and the server limits they are checked against.

use std::time::Duration;

use crate::DEFAULT_MAX_PAYLOAD;
use crate::error::Error;

/// Name of the stream holding every domain event.
pub const EVENTS_STREAM: &str = "EVENTS";
/// The server's limit on messages in one atomic batch.
pub(crate) const MAX_BATCH: usize = 1000;

/// Settings of the event store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Stream name.
    pub stream: String,
    /// Subject prefix; aggregates live on `<prefix>.<category>.<id>`.
    pub subject_prefix: String,
    /// Replicas of the stream (3 in production).
    pub replicas: usize,
    /// How long the server remembers event ids for dedup.
    pub duplicate_window: Duration,
    /// Largest accepted event data, in bytes.
    pub max_payload: usize,
    /// How long to wait for one server answer.
    pub request_timeout: Duration,
    /// Tries per append on timeouts and broken connections.
    pub max_attempts: usize,
    /// Group commit: concurrent appends share one atomic batch (one fsync).
    pub group_commit: GroupCommitConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            stream: EVENTS_STREAM.to_owned(),
            subject_prefix: "events".to_owned(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_payload: DEFAULT_MAX_PAYLOAD,
            request_timeout: Duration::from_secs(5),
            max_attempts: 5,
            group_commit: GroupCommitConfig::default(),
        }
    }
}

impl StoreConfig {
    /// Longest time an append keeps retrying with the same event ids
    /// (every attempt timing out, plus the capped backoff between them).
    pub fn retry_horizon(&self) -> Duration {
        let attempts = u32::try_from(self.max_attempts.max(1)).unwrap_or(u32::MAX);
        self.request_timeout.saturating_mul(attempts)
            + Duration::from_secs(2).saturating_mul(attempts)
    }

    /// Checks the settings that have limits.
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_attempts == 0 {
            return Err(Error::InvalidConfig("max_attempts must be > 0".to_owned()));
        }
        self.group_commit.validate()
    }
}

/// Settings of group commit (part of [`crate::StoreConfig`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCommitConfig {
    /// Gather concurrent appends into shared batches. When off, every append
    /// is its own write (one fsync each). Worth it when the server fsyncs
    /// every write (`sync_interval: always`); with the server's default fsync
    /// policy a batch costs more than the single writes it replaces, so turn
    /// it off there.
    pub enabled: bool,
    /// Most messages (events) in one batch; at most the server's atomic
    /// batch limit of 1000.
    pub max_batch_events: usize,
    /// Most bytes (data plus headers, estimated) in one batch; also capped by
    /// the server's `max_payload`, read at connect.
    pub max_batch_bytes: usize,
    /// How long a batch may wait for the writers of the batch that just
    /// finished to come back, 0..=2 ms. An idle store never waits.
    pub linger: Duration,
    /// Smallest group written as one atomic batch; smaller groups are
    /// written as single appends, concurrently. An atomic batch costs the
    /// server a fixed ~2.5 ms on an R1 file stream (measured on 2.15.1),
    /// which a few single writes with one fsync each undercut.
    pub min_batch_appends: usize,
    /// Batches written concurrently; the server allows 50 per stream. Only
    /// full batches are pipelined: a partial batch waits for the one in
    /// flight, since the server writes batches one after another at a fixed
    /// cost each.
    pub max_in_flight: usize,
    /// Appends that may wait in the queue; beyond that callers wait for room.
    pub queue_capacity: usize,
    /// How long a caller waits for room in a full queue before
    /// [`Error::Overloaded`].
    pub queue_timeout: Duration,
}

impl Default for GroupCommitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_batch_events: MAX_BATCH,
            max_batch_bytes: 1024 * 1024,
            linger: Duration::from_millis(1),
            min_batch_appends: 8,
            max_in_flight: 2,
            queue_capacity: 16 * 1024,
            queue_timeout: Duration::from_secs(5),
        }
    }
}

impl GroupCommitConfig {
    /// Checks the limits: batch size 1..=1000, linger <= 2 ms, at least one
    /// batch in flight (at most 50, the server's per-stream limit) and room
    /// in the queue.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |reason: String| Error::InvalidConfig(format!("group_commit: {reason}"));
        if self.max_batch_events == 0 || self.max_batch_events > MAX_BATCH {
            return Err(bad(format!(
                "max_batch_events {} must be 1..={MAX_BATCH}",
                self.max_batch_events
            )));
        }
        if self.min_batch_appends == 0 || self.min_batch_appends > self.max_batch_events {
            return Err(bad(format!(
                "min_batch_appends {} must be 1..=max_batch_events",
                self.min_batch_appends
            )));
        }
        if self.max_batch_bytes == 0 {
            return Err(bad("max_batch_bytes must be > 0".to_owned()));
        }
        if self.linger > Duration::from_millis(2) {
            return Err(bad(format!("linger {:?} must be at most 2ms", self.linger)));
        }
        if self.max_in_flight == 0 || self.max_in_flight > 50 {
            return Err(bad(format!(
                "max_in_flight {} must be 1..=50",
                self.max_in_flight
            )));
        }
        if self.queue_capacity == 0 {
            return Err(bad("queue_capacity must be > 0".to_owned()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_limits_are_checked() {
        assert!(GroupCommitConfig::default().validate().is_ok());
        for bad in [
            GroupCommitConfig {
                max_batch_events: 1001,
                ..Default::default()
            },
            GroupCommitConfig {
                max_batch_events: 0,
                ..Default::default()
            },
            GroupCommitConfig {
                linger: Duration::from_millis(3),
                ..Default::default()
            },
            GroupCommitConfig {
                max_in_flight: 0,
                ..Default::default()
            },
            GroupCommitConfig {
                queue_capacity: 0,
                ..Default::default()
            },
            GroupCommitConfig {
                min_batch_appends: 0,
                ..Default::default()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(Error::InvalidConfig(_))),
                "{bad:?}"
            );
        }
    }
}
