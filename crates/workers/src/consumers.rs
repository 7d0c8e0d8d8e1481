//! The kill switch and the consumer overview behind `sluice consumer ...`:
//! pause and resume a worker's durable consumers (server-side consumer
//! pause, nats-server 2.11+), and list every consumer with its backlog.
//!
//! A paused consumer delivers nothing until resumed (or until the pause
//! deadline); its workers stay connected and resume where they stopped.
//!
//! Also the workers' stored positions: a durable consumer's ack floor lives
//! in the consumer itself, so a consumer that disappears (deleted by an
//! operator or an intruder) would otherwise come back from the start of the
//! log and run every command again. Each running worker keeps its
//! consumers' ack floors in the `SLUICE_POSITIONS` bucket (about once a
//! second, and at shutdown); a consumer that existed and is gone is
//! recreated from there.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, kv};
use futures::StreamExt;
use serde::Serialize;
use sluice_events::{EVENTS_STREAM, validate_token};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use sluice_events::EventStore;

use crate::config::designates;
use crate::error::Error;
use crate::infra::{REDRIVE_STREAM, ensure_all};

/// One durable consumer as the operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerStatus {
    /// The stream it reads (`EVENTS` or `DLQ_REDRIVE`).
    pub stream: String,
    /// The durable consumer name.
    pub name: String,
    /// Messages not delivered yet.
    pub pending: u64,
    /// Messages delivered and not acknowledged yet.
    pub ack_pending: usize,
    /// Messages delivered more than once and not acknowledged yet.
    pub redelivered: usize,
    /// How far the consumer's ack floor is behind the stream's last
    /// sequence (events not yet known to be handled).
    pub lag: u64,
    /// Paused by an operator.
    pub paused: bool,
    /// When a pause ends by itself, if paused.
    pub pause_remaining_secs: Option<u64>,
    /// The pinned client id, when one replica holds the pin.
    pub pinned: Option<String>,
}

async fn streams(store: &EventStore) -> Result<Vec<jetstream::stream::Stream>, Error> {
    ensure_all(store, 1).await?;
    let mut out = Vec::new();
    for name in [EVENTS_STREAM, REDRIVE_STREAM] {
        match store.stream_named(name).await {
            Ok(s) => out.push(s),
            Err(e) if name == EVENTS_STREAM => {
                return Err(Error::nats("opening the EVENTS stream", e));
            }
            Err(_) => {}
        }
    }
    Ok(out)
}

/// Every durable consumer of `EVENTS` and `DLQ_REDRIVE`, by stream and name.
pub async fn list(store: &EventStore) -> Result<Vec<ConsumerStatus>, Error> {
    let mut out = Vec::new();
    for mut stream in streams(store).await? {
        let last = stream
            .info()
            .await
            .map_err(|e| Error::nats("reading stream info", e))?
            .state
            .last_sequence;
        let mut infos = stream.consumers();
        while let Some(info) = infos.next().await {
            let info = info.map_err(|e| Error::nats("listing consumers", e))?;
            if info.config.durable_name.is_none() {
                continue; // ephemeral readers (`sluice tail`, ...) are not workers
            }
            out.push(ConsumerStatus {
                stream: info.stream_name.clone(),
                name: info.name.clone(),
                pending: info.num_pending,
                ack_pending: info.num_ack_pending,
                redelivered: info.num_redelivered,
                lag: last.saturating_sub(info.ack_floor.stream_sequence),
                paused: info.paused,
                pause_remaining_secs: info.pause_remaining.map(|d| d.as_secs()),
                pinned: info
                    .priority_groups
                    .iter()
                    .find_map(|g| g.pinned_client_id.clone()),
            });
        }
    }
    out.sort_by(|a, b| (&a.stream, &a.name).cmp(&(&b.stream, &b.name)));
    Ok(out)
}

/// Pauses a consumer, or every consumer of a worker, for `duration`.
/// Returns the consumers paused.
pub async fn pause(
    store: &EventStore,
    name: &str,
    duration: Duration,
) -> Result<Vec<String>, Error> {
    validate_token("consumer", name)?;
    let until = OffsetDateTime::now_utc() + duration;
    let mut done = Vec::new();
    for stream in streams(store).await? {
        for consumer in matching(&stream, name).await? {
            stream
                .pause_consumer(&consumer, until)
                .await
                .map_err(|e| Error::nats("pausing a consumer", e))?;
            tracing::warn!(consumer = %consumer, until = %until.format(&Rfc3339).unwrap_or_default(), "consumer paused");
            done.push(consumer);
        }
    }
    if done.is_empty() {
        return Err(Error::UnknownConsumer(name.to_owned()));
    }
    Ok(done)
}

/// Resumes a consumer, or every consumer of a worker. Returns the consumers
/// resumed.
pub async fn resume(store: &EventStore, name: &str) -> Result<Vec<String>, Error> {
    validate_token("consumer", name)?;
    let mut done = Vec::new();
    for stream in streams(store).await? {
        for consumer in matching(&stream, name).await? {
            stream
                .resume_consumer(&consumer)
                .await
                .map_err(|e| Error::nats("resuming a consumer", e))?;
            tracing::info!(consumer = %consumer, "consumer resumed");
            done.push(consumer);
        }
    }
    if done.is_empty() {
        return Err(Error::UnknownConsumer(name.to_owned()));
    }
    Ok(done)
}

async fn matching(stream: &jetstream::stream::Stream, name: &str) -> Result<Vec<String>, Error> {
    let mut names = stream.consumer_names();
    let mut out = Vec::new();
    while let Some(n) = names.next().await {
        let n = n.map_err(|e| Error::nats("listing consumers", e))?;
        if designates(name, &n) {
            out.push(n);
        }
    }
    out.sort();
    Ok(out)
}

/// KV bucket of the workers' last known positions: key = durable consumer
/// name on `EVENTS`, value = its ack floor (stream sequence, decimal).
pub const POSITIONS_BUCKET: &str = "SLUICE_POSITIONS";

/// How often a running worker stores its consumers' positions.
const POSITION_INTERVAL: Duration = Duration::from_secs(1);

/// Where a worker's durable consumer starts when the worker starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartPosition {
    /// The consumer exists: keep it where it is (the server refuses to
    /// change a start position anyway).
    Keep(DeliverPolicy),
    /// It never existed here: from the start of the log.
    FirstStart,
    /// It existed and is gone: after its last stored ack floor.
    Recreate {
        /// First stream sequence it delivers.
        start_sequence: u64,
    },
}

impl StartPosition {
    /// The deliver policy of the consumer to create or update.
    pub fn deliver_policy(&self) -> DeliverPolicy {
        match self {
            StartPosition::Keep(p) => *p,
            StartPosition::FirstStart => DeliverPolicy::All,
            StartPosition::Recreate { start_sequence } => DeliverPolicy::ByStartSequence {
                start_sequence: *start_sequence,
            },
        }
    }
}

/// Decides where a consumer starts: `existing` is its current deliver policy
/// if it exists, `stored` its last stored ack floor if one was ever stored.
pub fn decide_start(existing: Option<DeliverPolicy>, stored: Option<u64>) -> StartPosition {
    match (existing, stored) {
        (Some(policy), _) => StartPosition::Keep(policy),
        // Nothing acknowledged yet: the start of the log, with the same
        // policy a replica starting at the same moment chose (the server
        // refuses to change a consumer's deliver policy).
        (None, None | Some(0)) => StartPosition::FirstStart,
        (None, Some(floor)) => StartPosition::Recreate {
            start_sequence: floor + 1,
        },
    }
}

/// The positions bucket, created (with `replicas`) when missing and allowed.
pub(crate) async fn ensure_positions_bucket(
    store: &EventStore,
    replicas: usize,
) -> Result<kv::Store, Error> {
    crate::infra::ensure_bucket(
        store,
        POSITIONS_BUCKET,
        "Sluice workers' last known consumer positions (ack floors)",
        replicas,
    )
    .await
}

async fn stored_position(kv: &kv::Store, name: &str) -> Result<Option<u64>, Error> {
    let value = kv
        .get(name)
        .await
        .map_err(|e| Error::nats("reading a stored consumer position", e))?;
    match value {
        None => Ok(None),
        Some(bytes) => std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| {
                Error::InvalidConfig(format!(
                    "the stored position of consumer {name} in {POSITIONS_BUCKET} is not a number: fix or delete that key (the consumer then starts from the beginning)"
                ))
            }),
    }
}

/// Where the durable consumer `name` of `events` starts (see
/// [`decide_start`]), storing the position of one that exists.
pub(crate) async fn start_position(
    store: &EventStore,
    events: &jetstream::stream::Stream,
    name: &str,
    replicas: usize,
) -> Result<StartPosition, Error> {
    let kv = ensure_positions_bucket(store, replicas).await?;
    let existing = events
        .get_consumer::<jetstream::consumer::pull::Config>(name)
        .await
        .ok();
    let stored = stored_position(&kv, name).await?;
    let decision = decide_start(
        existing
            .as_ref()
            .map(|c| c.cached_info().config.deliver_policy),
        stored,
    );
    match (&decision, &existing) {
        (StartPosition::Keep(_), Some(c)) => {
            let floor = c.cached_info().ack_floor.stream_sequence;
            if stored.is_none_or(|s| s < floor) {
                put_position(&kv, name, floor).await?;
            }
        }
        (StartPosition::FirstStart, _) => put_position(&kv, name, 0).await?,
        (StartPosition::Recreate { start_sequence }, _) => {
            tracing::warn!(
                consumer = name,
                start_sequence,
                "durable consumer disappeared; recreating it from its stored position, not from the start"
            );
        }
        _ => {}
    }
    Ok(decision)
}

async fn put_position(kv: &kv::Store, name: &str, floor: u64) -> Result<(), Error> {
    kv.put(name, floor.to_string().into())
        .await
        .map(|_| ())
        .map_err(|e| Error::nats("storing a consumer position", e))
}

/// Stores the ack floors of `names` (durable consumers on `EVENTS`) in
/// [`POSITIONS_BUCKET`] whenever they move, until `stop`, and once more then.
/// A consumer that is missing is left alone: the worker stops on it, and its
/// next start recreates it from the stored position.
pub(crate) async fn track_positions(
    store: EventStore,
    names: Vec<String>,
    stop: tokio_util::sync::CancellationToken,
) {
    let Ok(kv) = store.key_value(POSITIONS_BUCKET).await else {
        tracing::warn!(
            bucket = POSITIONS_BUCKET,
            "no positions bucket: a deleted consumer could not be recreated where it was"
        );
        return;
    };
    let Ok(events) = store.stream_named(EVENTS_STREAM).await else {
        return;
    };
    let mut last: Vec<u64> = vec![0; names.len()];
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tokio::time::sleep(POSITION_INTERVAL) => false,
        };
        for (name, last) in names.iter().zip(last.iter_mut()) {
            let Ok(mut c) = events
                .get_consumer::<jetstream::consumer::pull::Config>(name)
                .await
            else {
                continue;
            };
            let Ok(info) = c.info().await else { continue };
            let floor = info.ack_floor.stream_sequence;
            if floor > *last {
                match put_position(&kv, name, floor).await {
                    Ok(()) => *last = floor,
                    Err(e) => {
                        tracing::warn!(consumer = %name, error = %e, "cannot store the consumer position");
                    }
                }
            }
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_that_disappears_comes_back_after_its_stored_position() {
        let kept = DeliverPolicy::ByStartSequence { start_sequence: 7 };
        assert_eq!(
            decide_start(Some(kept), Some(40)),
            StartPosition::Keep(kept)
        );
        assert_eq!(decide_start(None, None), StartPosition::FirstStart);
        // Two replicas starting together: the second sees the first's 0.
        assert_eq!(decide_start(None, Some(0)), StartPosition::FirstStart);
        assert_eq!(
            decide_start(None, None).deliver_policy(),
            DeliverPolicy::All
        );
        let back = decide_start(None, Some(40));
        assert_eq!(back, StartPosition::Recreate { start_sequence: 41 });
        assert_eq!(
            back.deliver_policy(),
            DeliverPolicy::ByStartSequence { start_sequence: 41 }
        );
    }
}
