//! The kill switch and the consumer overview behind `sluice consumer ...`:
//! pause and resume a worker's durable consumers (server-side consumer
//! pause, nats-server 2.11+), and list every consumer with its backlog.
//!
//! A paused consumer delivers nothing until resumed (or until the pause
//! deadline); its workers stay connected and resume where they stopped.

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use serde::Serialize;
use sluice_events::{EVENTS_STREAM, validate_token};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

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

async fn streams(js: &jetstream::Context) -> Result<Vec<jetstream::stream::Stream>, Error> {
    ensure_all(js, 1).await?;
    let mut out = Vec::new();
    for name in [EVENTS_STREAM, REDRIVE_STREAM] {
        match js.get_stream(name).await {
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
pub async fn list(js: &jetstream::Context) -> Result<Vec<ConsumerStatus>, Error> {
    let mut out = Vec::new();
    for mut stream in streams(js).await? {
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

/// The consumers `name` designates: that consumer, or every consumer of the
/// worker called `name` (its partitions and its redrive consumer).
pub(crate) fn designates(name: &str, consumer: &str) -> bool {
    if consumer == name || consumer == format!("{name}-redrive") {
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

/// Pauses a consumer, or every consumer of a worker, for `duration`.
/// Returns the consumers paused.
pub async fn pause(
    js: &jetstream::Context,
    name: &str,
    duration: Duration,
) -> Result<Vec<String>, Error> {
    validate_token("consumer", name)?;
    let until = OffsetDateTime::now_utc() + duration;
    let mut done = Vec::new();
    for stream in streams(js).await? {
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
pub async fn resume(js: &jetstream::Context, name: &str) -> Result<Vec<String>, Error> {
    validate_token("consumer", name)?;
    let mut done = Vec::new();
    for stream in streams(js).await? {
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

#[cfg(test)]
mod tests {
    use super::designates;

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
