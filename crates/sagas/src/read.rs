//! Reads one aggregate's events with direct gets (no consumer).
//!
//! `EventStore::read` opens an ordered consumer per call, which the server
//! keeps for its inactivity threshold (30 s) after the read. Sagas read
//! small streams very often (every reply, claim, timeout and transition
//! reads the instance's log; every command reads its target), and thousands
//! of lingering consumers hit the server's consumer limit. A batched direct
//! get (`allow_direct` on `EVENTS`) costs one request per 256 events and
//! leaves nothing behind. A replica serving a direct get may lag the leader; every
//! write based on such a read is an optimistic append, so a stale read
//! costs a conflict and a reload, never a wrong write.

use async_nats::jetstream::stream::DirectGetErrorKind;
use sluice_events::{Envelope, EventStore, History, RecordedEvent, StreamId, Voided};

use crate::model::SagaError;

/// Messages asked for per batched direct get.
const BATCH: usize = 256;
/// How long a batched direct get may take before the one-by-one path is used.
const BATCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Every event of `stream_id` that is not voided, in order, and the
/// stream's version: batched direct gets (one request for up to 256 events,
/// nats-server 2.11+), or one direct get per event if a batch fails. An
/// event that does not decode names its position.
pub(crate) async fn read_events(
    store: &EventStore,
    stream_id: &StreamId,
) -> Result<History, SagaError> {
    let voided = store.voided().await?;
    match read_batched(store, stream_id, &voided).await {
        Ok(events) => Ok(events),
        Err(e @ SagaError::Events(_)) => Err(e),
        Err(e) => {
            tracing::debug!(stream = %stream_id, error = %e, "batched direct get failed; reading one by one");
            read_one_by_one(store, stream_id, &voided).await
        }
    }
}

/// Adds one stored message to `history`: skipped when voided, else decoded
/// (an undecodable one is an error naming its position).
fn push(
    history: &mut History,
    voided: &Voided,
    stream_id: &StreamId,
    position: u64,
    headers: &async_nats::HeaderMap,
    payload: &bytes::Bytes,
    max_payload: usize,
) -> Result<(), SagaError> {
    history.version = position;
    if voided.contains(position) {
        history.voided.push(position);
        return Ok(());
    }
    let envelope = Envelope::decode(Some(headers), payload, max_payload).map_err(|e| {
        sluice_events::Error::InvalidStoredEvent {
            position,
            stream: stream_id.to_string(),
            event_type: headers
                .get("ce-type")
                .map_or_else(|| "no type".to_owned(), |v| v.as_str().to_owned()),
            reason: e.to_string(),
        }
    })?;
    history.events.push(RecordedEvent {
        stream_id: stream_id.clone(),
        position,
        envelope,
    });
    Ok(())
}

fn empty() -> History {
    History {
        events: Vec::new(),
        version: 0,
        voided: Vec::new(),
    }
}

async fn read_batched(
    store: &EventStore,
    stream_id: &StreamId,
    voided: &Voided,
) -> Result<History, SagaError> {
    use futures::StreamExt;

    let nats = |e: &dyn std::fmt::Display| SagaError::Nats {
        doing: "reading a stream with batched direct gets",
        reason: e.to_string(),
    };
    let config = store.config();
    let client = store.client();
    let subject = stream_id.subject(&config.subject_prefix);
    let api = format!("$JS.API.DIRECT.GET.{}", config.stream);
    let mut out = empty();
    let mut next = 1u64;
    loop {
        let inbox = client.new_inbox();
        let mut replies = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| nats(&e))?;
        let body = serde_json::json!({ "seq": next, "next_by_subj": subject, "batch": BATCH });
        client
            .publish_with_reply(api.clone(), inbox, body.to_string().into())
            .await
            .map_err(|e| nats(&e))?;
        let mut got = 0;
        loop {
            let m = tokio::time::timeout(BATCH_TIMEOUT, replies.next())
                .await
                .map_err(|_| nats(&"timed out"))?
                .ok_or_else(|| nats(&"reply subscription closed"))?;
            match m.status.map(|s| s.as_u16()) {
                // End of batch, or nothing (more) to read.
                Some(204) => break,
                Some(404) => return Ok(out),
                Some(code) => {
                    return Err(nats(&format!(
                        "status {code} {}",
                        m.description.unwrap_or_default()
                    )));
                }
                None => {}
            }
            let headers = m
                .headers
                .as_ref()
                .ok_or_else(|| nats(&"reply without headers"))?;
            let sequence: u64 = headers
                .get("Nats-Sequence")
                .and_then(|v| v.as_str().parse().ok())
                .ok_or_else(|| nats(&"reply without Nats-Sequence"))?;
            push(
                &mut out,
                voided,
                stream_id,
                sequence,
                headers,
                &m.payload,
                config.max_payload,
            )?;
            next = sequence + 1;
            got += 1;
        }
        if got < BATCH {
            return Ok(out);
        }
    }
}

async fn read_one_by_one(
    store: &EventStore,
    stream_id: &StreamId,
    voided: &Voided,
) -> Result<History, SagaError> {
    let nats = |e: &dyn std::fmt::Display| SagaError::Nats {
        doing: "reading a stream with direct gets",
        reason: e.to_string(),
    };
    let config = store.config();
    let stream = store
        .jetstream()
        .get_stream_no_info(&config.stream)
        .await
        .map_err(|e| nats(&e))?;
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
                    &mut out,
                    voided,
                    stream_id,
                    m.sequence,
                    &m.headers,
                    &m.payload,
                    config.max_payload,
                )?;
                next = m.sequence + 1;
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(nats(&e)),
        }
    }
}
