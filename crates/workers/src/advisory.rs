//! Safety net: the server's `MAX_DELIVERIES` and `MSG_TERMINATED` advisories
//! for a worker's consumers become dead letters, so a worker that crashes or
//! hangs on a message (and so never writes the dead letter itself) still
//! leaves a record.
//!
//! The advisories are captured by the `SLUICE_ADVISORIES` stream, so they
//! are kept while no worker runs; each worker drains its own through a
//! durable consumer (any replica may take any advisory: the dead letter's
//! dedup id `<stream>:<consumer>:<seq>` makes a double write harmless).

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use serde::Deserialize;
use sluice_events::{EVENTS_STREAM, StreamId};
use tokio_util::sync::CancellationToken;

use sluice_events::EventStore;

use crate::config::{
    WorkerConfig, advisory_consumer_name, partition_consumer_names, redrive_consumer_name,
};
use crate::dlq::{self, Kind, NewDeadLetter};
use crate::error::Error;
use crate::infra::{ADVISORY_STREAM, REDRIVE_STREAM, TERM_MARKER, headers as h};
use crate::park::Parks;

#[derive(Debug, Deserialize)]
struct Advisory {
    #[serde(rename = "type", default)]
    kind: String,
    stream: String,
    consumer: String,
    stream_seq: u64,
    #[serde(default)]
    deliveries: u64,
    #[serde(default)]
    reason: Option<String>,
}

fn subjects(config: &WorkerConfig) -> Vec<String> {
    let mut out = Vec::new();
    let mut pairs: Vec<(&str, String)> = partition_consumer_names(config.name, config.partitions)
        .into_iter()
        .map(|c| (EVENTS_STREAM, c))
        .collect();
    pairs.push((REDRIVE_STREAM, redrive_consumer_name(config.name)));
    for (stream, consumer) in pairs {
        for kind in ["MAX_DELIVERIES", "MSG_TERMINATED"] {
            out.push(format!(
                "$JS.EVENT.ADVISORY.CONSUMER.{kind}.{stream}.{consumer}"
            ));
        }
    }
    out
}

/// Drains the worker's advisories until `cancel` fires.
pub(crate) async fn capture(
    store: EventStore,
    config: WorkerConfig,
    parks: Parks,
    cancel: CancellationToken,
) {
    loop {
        match capture_once(&store, &config, &parks, &cancel).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(worker = config.name, error = %e, "advisory capture failed; restarting");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

async fn capture_once(
    store: &EventStore,
    config: &WorkerConfig,
    parks: &Parks,
    cancel: &CancellationToken,
) -> Result<(), Error> {
    let stream = store
        .stream_named(ADVISORY_STREAM)
        .await
        .map_err(|e| Error::nats("opening the advisory stream", e))?;
    let name = advisory_consumer_name(config.name);
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.clone()),
            name: Some(name),
            description: Some(format!("Sluice worker {} advisory capture", config.name)),
            ack_policy: consumer::AckPolicy::Explicit,
            filter_subjects: subjects(config),
            ack_wait: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .map_err(|e| Error::nats("creating the advisory consumer", e))?;
    let mut messages = consumer
        .stream()
        .expires(Duration::from_secs(5))
        .heartbeat(Duration::from_secs(1))
        .messages()
        .await
        .map_err(|e| Error::nats("pulling advisories", e))?;
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            next = messages.next() => next,
        };
        let msg = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::debug!(worker = config.name, error = %e, "advisory pull error");
                continue;
            }
            None => return Err(Error::nats("pulling advisories", "stream ended")),
        };
        match serde_json::from_slice::<Advisory>(&msg.payload) {
            Ok(advisory) => {
                if let Err(e) = record(store, config, parks, &advisory).await {
                    tracing::warn!(worker = config.name, error = %e, "could not record an advisory; will retry");
                    let _ = msg
                        .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                    continue;
                }
            }
            Err(e) => tracing::warn!(worker = config.name, error = %e, "unreadable advisory"),
        }
        let _ = msg.ack().await;
    }
}

async fn record(
    store: &EventStore,
    config: &WorkerConfig,
    parks: &Parks,
    advisory: &Advisory,
) -> Result<(), Error> {
    if let Some(reason) = &advisory.reason
        && reason.starts_with(TERM_MARKER)
    {
        // Our own termination: the dead letter was written before it.
        return Ok(());
    }
    let what = if advisory.kind.contains("max_deliver") {
        format!(
            "server gave up after {} deliveries without an ack on consumer {}: the worker crashed or hung on this message",
            advisory.deliveries, advisory.consumer
        )
    } else {
        format!(
            "terminated by a client other than the Sluice runtime on consumer {} after {} deliveries: {}",
            advisory.consumer,
            advisory.deliveries,
            advisory.reason.as_deref().unwrap_or("no reason given")
        )
    };
    let stream = store
        .stream_named(&advisory.stream)
        .await
        .map_err(|e| Error::nats("opening a stream named by an advisory", e))?;
    let original = match stream.get_raw_message(advisory.stream_seq).await {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(worker = config.name, stream = %advisory.stream, seq = advisory.stream_seq, error = %e, reason = %what, "advisory names a message that is gone; nothing to dead-letter");
            return Ok(());
        }
    };
    let (subject, seq, redrive_of) = if advisory.stream == EVENTS_STREAM {
        (original.subject.to_string(), advisory.stream_seq, None)
    } else {
        let get = |n: &str| original.headers.get(n).map(|v| v.as_str().to_owned());
        let subject = get(h::SUBJECT).unwrap_or_default();
        let seq = get(h::SEQUENCE).and_then(|s| s.parse().ok()).unwrap_or(0);
        let of = get(h::REDRIVE_OF).and_then(|s| s.parse().ok()).unwrap_or(0);
        (subject, seq, Some(of))
    };
    let written = dlq::write(
        store,
        NewDeadLetter {
            consumer: config.name,
            subject: &subject,
            stream: EVENTS_STREAM,
            sequence: seq,
            deliveries: advisory.deliveries,
            reason: &what,
            kind: Kind::Advisory,
            headers: Some(&original.headers),
            payload: original.payload.clone(),
            parked_behind: None,
            redrive_of,
        },
    )
    .await;
    if let Err(e) = &written
        && e.is_cannot_dead_letter()
    {
        crate::health::halted(config.name, &subject, seq, e.to_string());
    }
    written?;
    if let Ok(stream_id) = StreamId::from_subject("events", &subject) {
        parks.park_head(&stream_id, seq).await?;
    }
    // The server had given up on it; now its dead letter is stored.
    crate::health::progressed(config.name, &subject);
    Ok(())
}
