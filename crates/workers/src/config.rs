//! A worker's settings and the names derived from its durable name: the
//! consumers on `EVENTS` (one per partition), on `DLQ_REDRIVE` and on
//! `SLUICE_ADVISORIES`. Renaming a worker re-consumes every event, so these
//! names are a contract.

use std::time::Duration;

use sluice_events::DEFAULT_MAX_PAYLOAD;

use crate::error::Error;
use crate::policy::RetryPolicy;

/// Longest worker name: leaves room for the `-p<i>-of-<P>` and `-redrive`
/// suffixes within NATS' consumer name limits.
const MAX_NAME_LEN: usize = 64;

/// Settings of one worker. `name` is the durable identity: renaming it
/// re-consumes every event, so names are constants (listed in a test).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Durable name: consumer names, DLQ subjects and parked keys derive from it.
    pub name: &'static str,
    /// Subjects of `EVENTS` this worker handles (default `events.>`).
    pub filter_subjects: Vec<String>,
    /// Partition consumers (default 1). Replicas share partitions: each
    /// partition is pinned to one replica at a time.
    pub partitions: u16,
    /// Lanes per process: how many aggregates are handled at once.
    pub concurrency: usize,
    /// Retry policy for transient failures.
    pub retry: RetryPolicy,
    /// The consumer's ack wait. In-progress acks keep long handlers and held
    /// messages alive; a crashed worker's messages come back after it.
    pub ack_wait: Duration,
    /// How long a silent replica keeps its pin before another takes over.
    /// Longer than `ack_wait`, so the crashed replica's unacked messages are
    /// redelivered (first, in order) before the new replica gets new ones.
    pub pin_timeout: Duration,
    /// Messages delivered but not yet acked, per consumer.
    pub max_ack_pending: i64,
    /// Messages per pull request.
    pub batch: usize,
    /// A handler running longer is abandoned as a transient failure.
    pub handler_timeout: Duration,
    /// Largest accepted event payload.
    pub max_payload: usize,
    /// Replicas of the DLQ streams and parked bucket, when this worker creates them.
    pub replicas: usize,
    /// Capture the server's `MAX_DELIVERIES` / `MSG_TERMINATED` advisories.
    pub capture_advisories: bool,
    /// How long a subject with redelivered messages waits before its first
    /// one is handled. After a replica crashes, the server redelivers its
    /// messages in the order their ack waits expired, which is not always
    /// stream order; waiting lets them gather so they are sorted.
    pub redelivery_settle: Duration,
    /// What to do with an event redelivered after a later event of its
    /// aggregate was handled here (see [`LateRedelivery`]).
    pub late_redelivery: LateRedelivery,
    /// This process is the worker's only consumer (`sluice up`): at start,
    /// take the consumers over from a dead predecessor (see [`take_over`](crate::take_over))
    /// instead of waiting `pin_timeout` and `ack_wait` for the server to
    /// notice. Never set it where another replica may be running: its
    /// in-flight messages would be delivered here too.
    pub take_over_on_start: bool,
}

/// What a worker does with a *late* event: one the server delivers after a
/// later event of the same aggregate was already handled by this process.
///
/// This happens only after a crash: a message an earlier owner (a killed
/// process, a replica that lost its pin, a server that lost its ack state)
/// received and never acknowledged comes back after its ack wait, behind
/// newer events the new owner already handled. Whether the earlier owner
/// applied it is unknown; only durable state can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LateRedelivery {
    /// Hand it to the handler, which recognises it from durable state (it
    /// is idempotent by event id, sequence or causation id, as every handler
    /// must be) and either finds its effect already there or decides it
    /// against the current state. The right choice when the handler checks
    /// what it applies (a guarded append, an upsert with a version).
    #[default]
    Handle,
    /// Dead-letter it (kind `late`) and park the aggregate, so an operator
    /// decides. For handlers whose effects must follow stream order and
    /// cannot check it themselves.
    DeadLetter,
}

impl WorkerConfig {
    /// Defaults for a worker called `name`.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            filter_subjects: vec!["events.>".to_owned()],
            partitions: 1,
            concurrency: 8,
            retry: RetryPolicy::default(),
            ack_wait: Duration::from_secs(30),
            pin_timeout: Duration::from_secs(90),
            max_ack_pending: 1000,
            batch: 200,
            handler_timeout: Duration::from_secs(300),
            max_payload: DEFAULT_MAX_PAYLOAD,
            replicas: 1,
            capture_advisories: true,
            redelivery_settle: Duration::from_millis(500),
            late_redelivery: LateRedelivery::Handle,
            take_over_on_start: false,
        }
    }

    /// Checks the settings that ordering and redelivery depend on.
    pub fn validate(&self) -> Result<(), Error> {
        sluice_events::validate_token("worker name", self.name)?;
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.name.len() > MAX_NAME_LEN {
            return bad(format!(
                "worker name is longer than {MAX_NAME_LEN} characters"
            ));
        }
        if self.filter_subjects.is_empty() {
            return bad("filter_subjects is empty".into());
        }
        if self.partitions == 0 || self.concurrency == 0 || self.batch == 0 {
            return bad("partitions, concurrency and batch must be at least 1".into());
        }
        if self.retry.max_attempts == 0 {
            return bad("retry.max_attempts must be at least 1".into());
        }
        if self.retry.cap >= self.ack_wait {
            return bad(format!(
                "retry.cap ({:?}) must be below ack_wait ({:?}), or a message held behind a delayed retry could be redelivered before it",
                self.retry.cap, self.ack_wait
            ));
        }
        if self.pin_timeout <= self.ack_wait {
            return bad(format!(
                "pin_timeout ({:?}) must exceed ack_wait ({:?}), or a new replica could see new messages before a crashed one's are redelivered",
                self.pin_timeout, self.ack_wait
            ));
        }
        if self.max_ack_pending < 1 {
            return bad("max_ack_pending must be at least 1".into());
        }
        Ok(())
    }

    /// The durable consumer names on `EVENTS`, one per partition.
    pub fn partition_consumers(&self) -> Vec<String> {
        partition_consumer_names(self.name, self.partitions)
    }
}

/// Durable consumer names on `EVENTS` of worker `name` with `partitions`:
/// `name` alone for one partition, else `name-p<i>-of-<P>`.
pub fn partition_consumer_names(name: &str, partitions: u16) -> Vec<String> {
    if partitions <= 1 {
        vec![name.to_owned()]
    } else {
        (0..partitions)
            .map(|i| format!("{name}-p{i}-of-{partitions}"))
            .collect()
    }
}

/// Durable consumer name on `DLQ_REDRIVE` of worker `name`.
pub fn redrive_consumer_name(name: &str) -> String {
    format!("{name}-redrive")
}

/// Durable consumer name on `SLUICE_ADVISORIES` of worker `name`.
pub fn advisory_consumer_name(name: &str) -> String {
    format!("{name}-advisories")
}

/// The consumers `name` designates: that consumer, or every consumer of the
/// worker called `name` (its partitions and its redrive consumer).
pub(crate) fn designates(name: &str, consumer: &str) -> bool {
    if consumer == name || consumer == redrive_consumer_name(name) {
        return true;
    }
    consumer
        .strip_prefix(name)
        .and_then(|rest| rest.strip_prefix("-p"))
        .and_then(|rest| rest.split_once("-of-"))
        .is_some_and(|(i, n)| {
            i.bytes().all(|b| b.is_ascii_digit()) && n.bytes().all(|b| b.is_ascii_digit())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_name_designates_its_partitions_and_redrive_consumer() {
        assert!(designates("billing", "billing"));
        assert!(designates("billing", "billing-p0-of-4"));
        assert!(designates("billing", "billing-redrive"));
        assert!(!designates("billing", "billing-advisories"));
        assert!(!designates("billing", "billing-v2"));
        assert!(!designates("billing", "billing-px-of-4"));
        assert!(!designates("bill", "billing"));
    }
}
