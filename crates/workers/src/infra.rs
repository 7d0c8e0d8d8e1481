//! The JetStream resources the workers own: the `DLQ` stream, the redrive
//! work queue, the audit log, the advisory capture and the parked-aggregate
//! bucket; plus the header names of the dead-letter format.

use std::time::Duration;

use async_nats::jetstream::{kv, stream};

use sluice_events::EventStore;

use crate::error::Error;

/// The dead-letter stream (contract: `DLQ` on `dlq.<consumer>.<category>`).
pub const DLQ_STREAM: &str = "DLQ";
/// Subject prefix of dead letters.
pub const DLQ_PREFIX: &str = "dlq";
/// Work queue that hands redriven dead letters back to one consumer
/// (`sluice.redrive.<consumer>`); never `EVENTS`, so no event is appended twice.
pub const REDRIVE_STREAM: &str = "DLQ_REDRIVE";
/// Subject prefix of redriven messages.
pub const REDRIVE_PREFIX: &str = "sluice.redrive";
/// Audit log of operator actions on dead letters (redrive, discard + reason).
pub const AUDIT_STREAM: &str = "DLQ_AUDIT";
/// Subject prefix of audit records (`sluice.dlq.audit.<consumer>`).
pub const AUDIT_PREFIX: &str = "sluice.dlq.audit";
/// Stream capturing the server's `MAX_DELIVERIES` and `MSG_TERMINATED`
/// advisories, so they survive while no worker is running.
pub const ADVISORY_STREAM: &str = "SLUICE_ADVISORIES";
/// KV bucket of parked aggregates, key `<consumer>.<category>.<id>`.
pub const PARKED_BUCKET: &str = "SLUICE_PARKED";
/// Category used for dead letters whose subject is not `events.<category>.<id>`.
pub const INVALID_CATEGORY: &str = "_invalid";

/// Dead-letter headers (the contract's format).
pub mod headers {
    /// Why the message was dead-lettered.
    pub const REASON: &str = "Sluice-Dlq-Reason";
    /// Stream the original lives in (`EVENTS`).
    pub const STREAM: &str = "Sluice-Dlq-Stream";
    /// Stream sequence of the original.
    pub const SEQUENCE: &str = "Sluice-Dlq-Sequence";
    /// Consumer (worker name) that failed on it.
    pub const CONSUMER: &str = "Sluice-Dlq-Consumer";
    /// Deliveries made before giving up.
    pub const DELIVERIES: &str = "Sluice-Dlq-Deliveries";
    /// When it was dead-lettered (RFC 3339).
    pub const FAILED_AT: &str = "Sluice-Dlq-Failed-At";
    /// Subject of the original (an addition to the contract's list: redrive
    /// needs it to keep per-aggregate order).
    pub const SUBJECT: &str = "Sluice-Dlq-Subject";
    /// Kind of failure: `decode`, `handler`, `panic`, `exhausted`, `parked`,
    /// `advisory` (for filtering; the reason has the detail).
    pub const KIND: &str = "Sluice-Dlq-Kind";
    /// For a parked message: stream sequence of the dead letter it waits behind.
    pub const PARKED_BEHIND: &str = "Sluice-Dlq-Parked-Behind";
    /// `reference` when the dead letter's body is empty because the copy
    /// would not have fitted the server's `max_payload`: the body is the
    /// original at `Sluice-Dlq-Stream` / `Sluice-Dlq-Sequence`.
    pub const BODY: &str = "Sluice-Dlq-Body";
    /// The value of [`BODY`] for a by-reference dead letter.
    pub const BODY_REFERENCE: &str = "reference";
    /// For a by-reference dead letter: the original body's size in bytes.
    pub const BODY_SIZE: &str = "Sluice-Dlq-Body-Size";
    /// The original `Nats-Msg-Id` (replaced by the dedup id in the copy).
    pub const ORIGINAL_MSG_ID: &str = "Sluice-Dlq-Original-Msg-Id";
    /// On a redriven message: the dead-letter id it came from.
    pub const REDRIVE_OF: &str = "Sluice-Redrive-Of";
    /// On a redriven message: set on the last one of its aggregate in a
    /// redrive run, so the worker knows when to release the aggregate.
    pub const REDRIVE_LAST: &str = "Sluice-Redrive-Last";
    /// NATS dedup header.
    pub const MSG_ID: &str = "Nats-Msg-Id";
}

/// Prefix of the reason Sluice gives the server in `+TERM <reason>`; the
/// advisory capture skips terminations carrying it (already dead-lettered).
pub(crate) const TERM_MARKER: &str = "sluice-dlq";

/// Priority group used for pinned-client consumers.
pub(crate) const PIN_GROUP: &str = "sluice";

/// Ensures every resource the workers and operator tools use.
pub(crate) async fn ensure_all(store: &EventStore, replicas: usize) -> Result<(), Error> {
    let base = |name: &str, subjects: Vec<String>, description: &str| {
        base_config(name, subjects, description, replicas)
    };
    let dlq = dlq_config(replicas);
    let redrive = stream::Config {
        retention: stream::RetentionPolicy::WorkQueue,
        duplicate_window: Duration::from_secs(24 * 3600),
        ..base(
            REDRIVE_STREAM,
            vec![format!("{REDRIVE_PREFIX}.>")],
            "Sluice redriven dead letters, one subject per consumer",
        )
    };
    let audit = base(
        AUDIT_STREAM,
        vec![format!("{AUDIT_PREFIX}.>")],
        "Sluice operator actions on dead letters",
    );
    let advisories = stream::Config {
        max_age: Duration::from_secs(7 * 24 * 3600),
        ..base(
            ADVISORY_STREAM,
            ["MAX_DELIVERIES", "MSG_TERMINATED"]
                .iter()
                .flat_map(|kind| {
                    [sluice_events::EVENTS_STREAM, REDRIVE_STREAM]
                        .map(|s| format!("$JS.EVENT.ADVISORY.CONSUMER.{kind}.{s}.*"))
                })
                .collect(),
            "Server advisories about Sluice consumers giving up on messages",
        )
    };
    for config in [dlq, redrive, audit, advisories] {
        ensure_stream(store, config).await?;
    }
    ensure_parked_bucket(store, replicas).await?;
    crate::consumers::ensure_positions_bucket(store, replicas).await?;
    Ok(())
}

/// A file stream with direct gets, as every dead-letter resource is.
fn base_config(
    name: &str,
    subjects: Vec<String>,
    description: &str,
    replicas: usize,
) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        subjects,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        allow_direct: true,
        description: Some(description.to_owned()),
        ..Default::default()
    }
}

fn dlq_config(replicas: usize) -> stream::Config {
    stream::Config {
        // Dead letters are deduplicated by `<stream>:<consumer>:<seq>`; a day
        // covers a worker that crash-loops for hours.
        duplicate_window: Duration::from_secs(24 * 3600),
        ..base_config(
            DLQ_STREAM,
            vec![format!("{DLQ_PREFIX}.>")],
            "Sluice dead letters: original body and headers plus Sluice-Dlq-* headers",
            replicas,
        )
    }
}

/// Only the `DLQ` stream: what a writer of dead letters that takes no
/// redrives (a projection runner) needs, and all its NATS user may touch.
pub(crate) async fn ensure_dlq_stream(store: &EventStore, replicas: usize) -> Result<(), Error> {
    ensure_stream(store, dlq_config(replicas)).await
}

async fn ensure_stream(store: &EventStore, config: stream::Config) -> Result<(), Error> {
    let name = config.name.clone();
    store
        .ensure_stream(config)
        .await
        .map_err(|e| Error::nats("creating a stream", format!("{name}: {e}")))
}

pub(crate) async fn ensure_parked_bucket(
    store: &EventStore,
    replicas: usize,
) -> Result<kv::Store, Error> {
    ensure_bucket(
        store,
        PARKED_BUCKET,
        "Sluice aggregates parked behind a dead letter, per consumer",
        replicas,
    )
    .await
}

/// A one-value-per-key file bucket of the workers' bookkeeping, created
/// (with `replicas`) when missing; a concurrent creator's bucket is taken.
pub(crate) async fn ensure_bucket(
    store: &EventStore,
    bucket: &str,
    description: &str,
    replicas: usize,
) -> Result<kv::Store, Error> {
    store
        .ensure_key_value(kv::Config {
            bucket: bucket.to_owned(),
            description: description.to_owned(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::nats("creating a bucket", format!("{bucket}: {e}")))
}

/// Stable 64-bit hash of a subject: FNV-1a, then MurmurHash3's finaliser
/// (FNV alone mixes short, similar subjects poorly into the high bits).
/// Stable across processes and versions (unlike `std`'s hasher), because
/// partitions must agree; pinned by a test.
pub fn subject_hash(subject: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in subject.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The partition (0-based) of a subject among `partitions`.
pub fn partition_of(subject: &str, partitions: u16) -> u16 {
    (subject_hash(subject) % u64::from(partitions.max(1))) as u16
}

/// The in-process lane of a subject among `lanes`; uses the high bits so it
/// is independent of the partition choice.
pub(crate) fn lane_of(subject: &str, lanes: usize) -> usize {
    ((subject_hash(subject) >> 32) % lanes.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_spreads() {
        // Pinned: changing the hash reshuffles partitions of running workers.
        assert_eq!(subject_hash(""), 0xefd0_1f60_ba99_2926);
        assert_eq!(subject_hash("a"), 0x82a2_a958_a9be_ce5b);
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[partition_of(&format!("events.account.acc-{i}"), 4) as usize] += 1;
        }
        assert!(counts.iter().all(|c| *c > 800), "{counts:?}");
        let mut lanes = [0usize; 8];
        for i in 0..4000 {
            lanes[lane_of(&format!("events.account.acc-{i}"), 8)] += 1;
        }
        assert!(lanes.iter().all(|c| *c > 400), "{lanes:?}");
    }
}
