//! Reading the log: an aggregate's version and history, ranges of events,
//! and live feeds.

use std::sync::Arc;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use futures::stream::BoxStream;

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
        Err(e) => Err(Error::Nats(e.to_string())),
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
        .map_err(|e| Error::Nats(e.to_string()))?;
    consumer
        .messages()
        .await
        .map_err(|e| Error::Nats(e.to_string()))
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
        let m = m.map_err(|e| Error::Nats(e.to_string()))?;
        let position = m
            .info()
            .map_err(|e| Error::Nats(e.to_string()))?
            .stream_sequence;
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
    let m = m.map_err(|e| Error::Nats(e.to_string()))?;
    let position = m
        .info()
        .map_err(|e| Error::Nats(e.to_string()))?
        .stream_sequence;
    let stream_id = StreamId::from_subject(prefix, &m.subject)?;
    let envelope = Envelope::decode(m.headers.as_ref(), &m.payload, usize::MAX).map_err(|e| {
        Error::InvalidStoredEvent {
            position,
            stream: stream_id.to_string(),
            event_type: m
                .headers
                .as_ref()
                .and_then(|h| h.get(H_TYPE))
                .map_or_else(|| "no type".to_owned(), |v| v.as_str().to_owned()),
            reason: e.to_string(),
        }
    })?;
    Ok(RecordedEvent {
        stream_id,
        position,
        envelope,
    })
}
