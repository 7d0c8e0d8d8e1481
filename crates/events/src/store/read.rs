//! Reading the log: an aggregate's version and history (through a consumer
//! or with direct gets), ranges of events, and live feeds.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use futures::stream::BoxStream;

use super::config::StoreConfig;
use super::types::{History, RecordedEvent};
use super::voided::Voided;
use crate::envelope::{Envelope, H_TYPE};
use crate::error::Error;
use crate::ids::StreamId;

/// A stream of stored events, decoded.
pub(super) type Events = BoxStream<'static, Result<RecordedEvent, Error>>;

/// The version of the aggregate on `subject`: the position of its last
/// event, 0 when it has none.
pub(super) async fn last_version_of(stream: &stream::Stream, subject: &str) -> Result<u64, Error> {
    match stream.direct_get_last_for_subject(subject).await {
        Ok(msg) => Ok(msg.sequence),
        Err(e) if matches!(e.kind(), stream::DirectGetErrorKind::NotFound) => Ok(0),
        Err(e) => Err(Error::DirectGet(e)),
    }
}

/// An ordered consumer's messages on `filter`.
pub(super) async fn ordered(
    stream: &stream::Stream,
    filter: String,
    deliver_policy: consumer::DeliverPolicy,
) -> Result<consumer::pull::Ordered, Error> {
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(Error::CreateReader)?;
    consumer.messages().await.map_err(Error::OpenReader)
}

/// The aggregate's events up to its current version, voided ones left out
/// (one ordered consumer).
pub(super) async fn history(
    stream: &stream::Stream,
    prefix: &str,
    voided: &Voided,
    stream_id: &StreamId,
) -> Result<History, Error> {
    let subject = stream_id.subject(prefix);
    let last = last_version_of(stream, &subject).await?;
    let mut history = History {
        events: Vec::new(),
        version: last,
        voided: Vec::new(),
    };
    if last == 0 {
        return Ok(history);
    }
    let mut messages = ordered(
        stream,
        subject,
        consumer::DeliverPolicy::ByStartSequence { start_sequence: 1 },
    )
    .await?;
    while let Some(m) = messages.next().await {
        let m = m.map_err(Error::Read)?;
        let position = m.info().map_err(Error::MessageInfo)?.stream_sequence;
        if voided.contains(position) {
            history.voided.push(position);
        } else {
            history.events.push(decode_message(prefix, Ok(m))?);
        }
        if position >= last {
            break;
        }
    }
    Ok(history)
}

/// The events on `filter` from position `from` up to `last`, then the end.
pub(super) async fn range(
    stream: &stream::Stream,
    prefix: &str,
    filter: String,
    from: u64,
    last: u64,
) -> Result<Events, Error> {
    if last == 0 || from > last {
        return Ok(futures::stream::empty().boxed());
    }
    let messages = ordered(
        stream,
        filter,
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: from,
        },
    )
    .await?;
    let prefix: Arc<str> = prefix.into();
    // Stop right after the last event: waiting for one past it would hang.
    let events = futures::stream::unfold(Some(messages), move |state| {
        let prefix = prefix.clone();
        async move {
            let mut messages = state?;
            let item = messages.next().await?;
            let decoded = decode_message(&prefix, item);
            let done = match &decoded {
                Ok(ev) => ev.position >= last,
                Err(_) => true,
            };
            Some((decoded, if done { None } else { Some(messages) }))
        }
    });
    Ok(events.boxed())
}

/// A live feed of the events on `filter`; never ends.
pub(super) async fn subscribe(
    stream: &stream::Stream,
    prefix: &str,
    filter: &str,
    deliver_policy: consumer::DeliverPolicy,
) -> Result<Events, Error> {
    let messages = ordered(stream, filter.to_owned(), deliver_policy).await?;
    let prefix = prefix.to_owned();
    Ok(messages.map(move |m| decode_message(&prefix, m)).boxed())
}

fn decode_message(
    prefix: &str,
    m: Result<jetstream::Message, consumer::pull::OrderedError>,
) -> Result<RecordedEvent, Error> {
    let m = m.map_err(Error::Read)?;
    let position = m.info().map_err(Error::MessageInfo)?.stream_sequence;
    let stream_id = StreamId::from_subject(prefix, &m.subject)?;
    let envelope = decode_stored(&stream_id, position, m.headers.as_ref(), &m.payload)?;
    Ok(RecordedEvent {
        stream_id,
        position,
        envelope,
    })
}

/// The envelope of the stored message at `position`, or
/// [`Error::InvalidStoredEvent`] naming it.
fn decode_stored(
    stream_id: &StreamId,
    position: u64,
    headers: Option<&HeaderMap>,
    payload: &bytes::Bytes,
) -> Result<Envelope, Error> {
    Envelope::decode(headers, payload, usize::MAX).map_err(|e| Error::InvalidStoredEvent {
        position,
        stream: stream_id.to_string(),
        event_type: headers
            .and_then(|h| h.get(H_TYPE))
            .map_or_else(|| "no type".to_owned(), |v| v.as_str().to_owned()),
        reason: e.to_string(),
    })
}

/// Messages asked for per batched direct get.
const DIRECT_BATCH: usize = 256;
/// How long a batched direct get may take before the one-by-one path is used.
const DIRECT_BATCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a batched direct get did not give the history.
enum Batched {
    /// A stored event does not decode: that is the answer.
    Stored(Error),
    /// The batched request failed (an older server, a timeout, an
    /// unexpected reply): the one-by-one path may still succeed.
    Failed(String),
}

impl From<Error> for Batched {
    fn from(e: Error) -> Self {
        Batched::Stored(e)
    }
}

/// The aggregate's events, voided ones left out, with direct gets: batched
/// (one request for up to 256 events, nats-server 2.11+), or one direct get
/// per event if a batch fails.
pub(super) async fn history_direct(
    client: &async_nats::Client,
    stream: &stream::Stream,
    config: &StoreConfig,
    voided: &Voided,
    stream_id: &StreamId,
) -> Result<History, Error> {
    match batched(client, config, voided, stream_id).await {
        Ok(history) => Ok(history),
        Err(Batched::Stored(e)) => Err(e),
        Err(Batched::Failed(reason)) => {
            tracing::debug!(stream = %stream_id, error = %reason, "batched direct get failed; reading one by one");
            one_by_one(stream, config, voided, stream_id).await
        }
    }
}

fn empty() -> History {
    History {
        events: Vec::new(),
        version: 0,
        voided: Vec::new(),
    }
}

/// Adds one stored message to `history`: skipped when voided, else decoded
/// (an undecodable one is an error naming its position).
fn push(
    history: &mut History,
    voided: &Voided,
    stream_id: &StreamId,
    position: u64,
    headers: &HeaderMap,
    payload: &bytes::Bytes,
) -> Result<(), Error> {
    history.version = position;
    if voided.contains(position) {
        history.voided.push(position);
        return Ok(());
    }
    let envelope = decode_stored(stream_id, position, Some(headers), payload)?;
    history.events.push(RecordedEvent {
        stream_id: stream_id.clone(),
        position,
        envelope,
    });
    Ok(())
}

async fn batched(
    client: &async_nats::Client,
    config: &StoreConfig,
    voided: &Voided,
    stream_id: &StreamId,
) -> Result<History, Batched> {
    let failed = |e: &dyn std::fmt::Display| Batched::Failed(e.to_string());
    let subject = stream_id.subject(&config.subject_prefix);
    let api = format!("$JS.API.DIRECT.GET.{}", config.stream);
    let mut out = empty();
    let mut next = 1u64;
    loop {
        let inbox = client.new_inbox();
        let mut replies = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| failed(&e))?;
        let body =
            serde_json::json!({ "seq": next, "next_by_subj": subject, "batch": DIRECT_BATCH });
        client
            .publish_with_reply(api.clone(), inbox, body.to_string().into())
            .await
            .map_err(|e| failed(&e))?;
        let mut got = 0;
        loop {
            let m = tokio::time::timeout(DIRECT_BATCH_TIMEOUT, replies.next())
                .await
                .map_err(|_| failed(&"timed out"))?
                .ok_or_else(|| failed(&"reply subscription closed"))?;
            match m.status.map(|s| s.as_u16()) {
                // End of batch, or nothing (more) to read.
                Some(204) => break,
                Some(404) => return Ok(out),
                Some(code) => {
                    return Err(failed(&format!(
                        "status {code} {}",
                        m.description.unwrap_or_default()
                    )));
                }
                None => {}
            }
            let headers = m
                .headers
                .as_ref()
                .ok_or_else(|| failed(&"reply without headers"))?;
            let sequence: u64 = headers
                .get("Nats-Sequence")
                .and_then(|v| v.as_str().parse().ok())
                .ok_or_else(|| failed(&"reply without Nats-Sequence"))?;
            push(&mut out, voided, stream_id, sequence, headers, &m.payload)?;
            next = sequence + 1;
            got += 1;
        }
        if got < DIRECT_BATCH {
            return Ok(out);
        }
    }
}

async fn one_by_one(
    stream: &stream::Stream,
    config: &StoreConfig,
    voided: &Voided,
    stream_id: &StreamId,
) -> Result<History, Error> {
    let subject = stream_id.subject(&config.subject_prefix);
    let mut out = empty();
    let mut next = 1;
    loop {
        match stream
            .direct_get_next_for_subject(subject.clone(), Some(next))
            .await
        {
            Ok(m) => {
                push(
                    &mut out, voided, stream_id, m.sequence, &m.headers, &m.payload,
                )?;
                next = m.sequence + 1;
            }
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::DirectGet(e)),
        }
    }
}
