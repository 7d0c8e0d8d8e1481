//! The dead-letter stream: how workers write to it, and the operator API
//! (`list`, `show`, `redrive`, `discard`) behind `sluice dlq` and, later,
//! the HTTP API.
//!
//! A dead letter is a full copy of the original message (body and headers)
//! on `dlq.<consumer>.<category>` in the `DLQ` stream, plus the
//! `Sluice-Dlq-*` headers. Its id is its sequence in `DLQ`.
//!
//! A copy always fits: when body and headers together would exceed the
//! server's `max_payload`, the dead letter is stored *by reference*, with an
//! empty body and `Sluice-Dlq-Body: reference`; the original stays at
//! `Sluice-Dlq-Stream` / `Sluice-Dlq-Sequence`, and [`show`] and redrive
//! fetch it from there with a direct get. [`write()`] is the one writer of
//! dead letters: workers and projections both use it.
//!
//! Redrive hands messages back to the one consumer that failed on them,
//! through the `DLQ_REDRIVE` work queue (`sluice.redrive.<consumer>`); it never
//! appends to `EVENTS`. It publishes in original order, with a dedup id per
//! dead letter, then deletes the dead letter and writes an audit record, so
//! running it twice hands nothing back twice.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use sluice_events::{StreamId, validate_token};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use sluice_events::EventStore;

use crate::error::Error;
use crate::infra::{
    AUDIT_PREFIX, AUDIT_STREAM, DLQ_PREFIX, DLQ_STREAM, INVALID_CATEGORY, REDRIVE_PREFIX,
    ensure_all, ensure_parked_bucket, headers as h,
};
use crate::park::Parks;

/// Why a message was dead-lettered, coarsely (the reason has the detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The message breaks the CloudEvents contract.
    Decode,
    /// The handler returned a permanent error.
    Handler,
    /// The handler panicked.
    Panic,
    /// Transient failures until the attempts ran out.
    Exhausted,
    /// Parked behind an earlier dead letter of the same aggregate.
    Parked,
    /// Recorded from a server advisory (the worker crashed or hung).
    Advisory,
    /// Redelivered after a later event of its aggregate was handled.
    Late,
}

impl Kind {
    /// The wire name (`Sluice-Dlq-Kind`, and projections' `sluice_dead_letters.kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Decode => "decode",
            Kind::Handler => "handler",
            Kind::Panic => "panic",
            Kind::Exhausted => "exhausted",
            Kind::Parked => "parked",
            Kind::Advisory => "advisory",
            Kind::Late => "late",
        }
    }
}

/// Everything needed to write one dead letter.
#[derive(Debug, Clone)]
pub struct NewDeadLetter<'a> {
    /// The consumer (worker name, or `projection-<name>`) that failed on it.
    pub consumer: &'a str,
    /// Subject of the original message.
    pub subject: &'a str,
    /// Stream of the original (`EVENTS`): where a by-reference copy points.
    pub stream: &'a str,
    /// Stream sequence of the original.
    pub sequence: u64,
    /// Deliveries made before giving up.
    pub deliveries: u64,
    /// Why (one line; clipped to 1000 characters).
    pub reason: &'a str,
    /// Coarse kind of the failure.
    pub kind: Kind,
    /// The original headers, copied (without the server's control headers).
    pub headers: Option<&'a HeaderMap>,
    /// The original body, copied unless the copy would not fit.
    pub payload: Bytes,
    /// For a parked message: the sequence of the dead letter it waits behind.
    pub parked_behind: Option<u64>,
    /// Set for a redriven message failing again: the first dead letter of
    /// `<stream>:<consumer>:<seq>` is gone, and the server must not dedup
    /// the new one against it.
    pub redrive_of: Option<u64>,
}

/// The reason a dead letter gives for an event the decoder refused: the
/// decoder's precise message, and for an oversized event the
/// `PayloadTooLarge` code operators and tests filter on.
pub fn decode_reason(e: &sluice_events::Error) -> String {
    match e {
        sluice_events::Error::PayloadTooLarge { .. } => format!("PayloadTooLarge: {e}"),
        other => format!("decode: {other}"),
    }
}

/// Bytes a header block takes on the wire (`NATS/1.0\r\n`, one
/// `Name: value\r\n` per value, a blank line): what counts against the
/// server's `max_payload` besides the body.
fn header_len(headers: &HeaderMap) -> usize {
    let mut n = "NATS/1.0\r\n\r\n".len();
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        for v in values {
            n += name.len() + 2 + v.as_str().len() + 2;
        }
    }
    n
}

/// Room kept below `max_payload` for what the client adds to a publish.
const PUBLISH_MARGIN: usize = 512;

/// The category token of a subject, or [`INVALID_CATEGORY`].
pub(crate) fn category_of(subject: &str) -> String {
    StreamId::from_subject("events", subject)
        .map(|s| s.category().to_owned())
        .unwrap_or_else(|_| INVALID_CATEGORY.to_owned())
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

/// Writes a dead letter and waits for the server's ack. Returns its id.
///
/// The copy always fits the server's `max_payload`: when the original body
/// and the headers would not, the body is left out and the dead letter
/// refers to the original (`Sluice-Dlq-Body: reference`); when even the
/// copied headers would not, only the `Sluice-Dlq-*` headers are kept.
/// Any failure is [`Error::CannotDeadLetter`]: the caller must not move on.
pub async fn write(store: &EventStore, dl: NewDeadLetter<'_>) -> Result<u64, Error> {
    let mut ours = HeaderMap::new();
    let reason: String = dl
        .reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1000)
        .collect();
    ours.insert(h::REASON, reason.as_str());
    ours.insert(h::STREAM, dl.stream);
    ours.insert(h::SEQUENCE, dl.sequence.to_string().as_str());
    ours.insert(h::CONSUMER, dl.consumer);
    ours.insert(h::DELIVERIES, dl.deliveries.to_string().as_str());
    ours.insert(h::FAILED_AT, now_rfc3339().as_str());
    ours.insert(h::SUBJECT, dl.subject);
    ours.insert(h::KIND, dl.kind.as_str());
    if let Some(head) = dl.parked_behind {
        ours.insert(h::PARKED_BEHIND, head.to_string().as_str());
    }
    let dedup = match dl.redrive_of {
        None => format!("{}:{}:{}", dl.stream, dl.consumer, dl.sequence),
        Some(r) => format!("{}:{}:{}:redrive-{r}", dl.stream, dl.consumer, dl.sequence),
    };
    ours.insert(h::MSG_ID, dedup.as_str());
    let mut headers = HeaderMap::new();
    if let Some(original) = dl.headers {
        for (name, values) in original.iter() {
            let name: &str = name.as_ref();
            // Drop our own headers of an earlier dead-lettering (a redriven
            // message failing again) and the server's control headers: the
            // stored copy of an atomic append still carries `Nats-Batch-*`,
            // which would make this publish a batch, and `Nats-Msg-Id` is
            // replaced by the dead letter's dedup id (kept below).
            if name.starts_with("Sluice-Dlq-")
                || name.starts_with("Sluice-Redrive-")
                || name.len() > 5 && name[..5].eq_ignore_ascii_case("Nats-")
            {
                continue;
            }
            for v in values {
                headers.append(name, v.as_str());
            }
        }
        if let Some(id) = original.get(h::MSG_ID) {
            headers.insert(h::ORIGINAL_MSG_ID, id.as_str());
        } else if let Some(id) = original.get(h::ORIGINAL_MSG_ID) {
            headers.insert(h::ORIGINAL_MSG_ID, id.as_str());
        }
    }
    for (name, values) in ours.iter() {
        let name: &str = name.as_ref();
        for v in values {
            headers.insert(name, v.as_str());
        }
    }
    let max_payload = store.server_info().max_payload;
    let fits = |hm: &HeaderMap, body: usize| {
        max_payload == 0 || header_len(hm) + body + PUBLISH_MARGIN <= max_payload
    };
    let size = dl.payload.len();
    let (headers, payload, by_reference) = if fits(&headers, size) {
        (headers, dl.payload, false)
    } else {
        let refer = |mut hm: HeaderMap| {
            hm.insert(h::BODY, h::BODY_REFERENCE);
            hm.insert(h::BODY_SIZE, size.to_string().as_str());
            hm
        };
        let with_headers = refer(headers);
        if fits(&with_headers, 0) {
            (with_headers, Bytes::new(), true)
        } else {
            (refer(ours), Bytes::new(), true)
        }
    };
    let subject = format!("{DLQ_PREFIX}.{}.{}", dl.consumer, category_of(dl.subject));
    let cannot = |e: &dyn std::fmt::Display| Error::CannotDeadLetter {
        consumer: dl.consumer.to_owned(),
        subject: dl.subject.to_owned(),
        sequence: dl.sequence,
        cause: e.to_string(),
    };
    let ack = store
        .publish_to(subject, headers, payload)
        .await
        .map_err(|e| cannot(&e))?
        .await
        .map_err(|e| cannot(&e))?;
    tracing::warn!(
        consumer = dl.consumer,
        subject = dl.subject,
        sequence = dl.sequence,
        kind = dl.kind.as_str(),
        dlq_id = ack.sequence,
        duplicate = ack.duplicate,
        by_reference,
        reason = %reason,
        "dead-lettered"
    );
    Ok(ack.sequence)
}

/// The original message a by-reference dead letter (or a redriven message
/// made from one) points to, read with a direct get; `None` when `headers`
/// do not mark a by-reference body.
///
/// The headers returned are the original's plus every `Sluice-*` header of
/// `headers`, so a redriven message keeps what the runtime routes it by.
pub async fn resolve_reference(
    store: &EventStore,
    headers: &HeaderMap,
) -> Result<Option<(HeaderMap, Bytes)>, Error> {
    if headers.get(h::BODY).map(async_nats::HeaderValue::as_str) != Some(h::BODY_REFERENCE) {
        return Ok(None);
    }
    let get = |n: &str| headers.get(n).map(|v| v.as_str().to_owned());
    let (Some(stream), Some(sequence)) = (
        get(h::STREAM),
        get(h::SEQUENCE).and_then(|s| s.parse::<u64>().ok()),
    ) else {
        return Err(Error::OriginalMissing {
            stream: get(h::STREAM).unwrap_or_default(),
            sequence: 0,
            cause: "the reference has no Sluice-Dlq-Stream / Sluice-Dlq-Sequence".to_owned(),
        });
    };
    let missing = |cause: String| Error::OriginalMissing {
        stream: stream.clone(),
        sequence,
        cause,
    };
    let s = store
        .stream_handle(&stream)
        .await
        .map_err(|e| missing(e.to_string()))?;
    let original = s
        .direct_get(sequence)
        .await
        .map_err(|e| missing(e.to_string()))?;
    let mut merged = HeaderMap::new();
    for (name, values) in original.headers.iter() {
        let name: &str = name.as_ref();
        if name.len() > 5 && name[..5].eq_ignore_ascii_case("Nats-") {
            continue;
        }
        for v in values {
            merged.append(name, v.as_str());
        }
    }
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        if name.starts_with("Sluice-") || name.eq_ignore_ascii_case(h::MSG_ID) {
            for v in values {
                merged.insert(name, v.as_str());
            }
        }
    }
    Ok(Some((merged, original.payload)))
}

/// One dead letter as the operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Its id: the sequence in the `DLQ` stream.
    pub id: u64,
    /// The consumer (worker name) that failed on it.
    pub consumer: String,
    /// Aggregate category (`_invalid` when the subject was not a Sluice one).
    pub category: String,
    /// Subject of the original message.
    pub subject: String,
    /// Stream of the original (`EVENTS`).
    pub stream: String,
    /// Stream sequence of the original.
    pub sequence: u64,
    /// Why it was dead-lettered.
    pub reason: String,
    /// `decode`, `handler`, `panic`, `exhausted`, `parked` or `advisory`.
    pub kind: String,
    /// Deliveries before giving up.
    pub deliveries: u64,
    /// When it failed (RFC 3339).
    pub failed_at: String,
    /// For a parked message: the dead letter's original sequence it waits behind.
    pub parked_behind: Option<u64>,
    /// CloudEvents type, when the original had one.
    pub event_type: Option<String>,
    /// CloudEvents id, when the original had one.
    pub event_id: Option<String>,
    /// When the dead letter was stored.
    #[serde(with = "time::serde::rfc3339")]
    pub stored_at: OffsetDateTime,
    /// Every header, in name order.
    pub headers: BTreeMap<String, Vec<String>>,
    /// The body is not in the dead letter (it would not have fitted): it is
    /// the original at `stream`/`sequence`. [`show`] fills `body` from there;
    /// [`list`] leaves it empty.
    pub by_reference: bool,
    /// The original body (lossy UTF-8 when shown as text).
    #[serde(serialize_with = "body_as_text")]
    pub body: Bytes,
}

fn body_as_text<S: serde::Serializer>(body: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(body))
}

impl DeadLetter {
    fn parse(
        id: u64,
        stored_at: OffsetDateTime,
        headers: Option<&HeaderMap>,
        body: Bytes,
    ) -> Result<Self, Error> {
        let get = |name: &str| {
            headers
                .and_then(|hm| hm.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let need = |name: &str| {
            get(name).ok_or_else(|| Error::Malformed {
                id,
                reason: format!("missing header {name}"),
            })
        };
        let num = |name: &str| -> Result<u64, Error> {
            need(name)?.parse().map_err(|_| Error::Malformed {
                id,
                reason: format!("header {name} is not a number"),
            })
        };
        let subject = need(h::SUBJECT)?;
        let mut all = BTreeMap::new();
        if let Some(hm) = headers {
            for (name, values) in hm.iter() {
                let name: &str = name.as_ref();
                all.insert(
                    name.to_owned(),
                    values.iter().map(|v| v.as_str().to_owned()).collect(),
                );
            }
        }
        Ok(Self {
            id,
            consumer: need(h::CONSUMER)?,
            category: category_of(&subject),
            stream: need(h::STREAM)?,
            sequence: num(h::SEQUENCE)?,
            reason: need(h::REASON)?,
            kind: get(h::KIND).unwrap_or_default(),
            deliveries: num(h::DELIVERIES).unwrap_or(0),
            failed_at: get(h::FAILED_AT).unwrap_or_default(),
            parked_behind: get(h::PARKED_BEHIND).and_then(|v| v.parse().ok()),
            event_type: get("ce-type"),
            event_id: get("ce-id"),
            by_reference: get(h::BODY).as_deref() == Some(h::BODY_REFERENCE),
            subject,
            stored_at,
            headers: all,
            body,
        })
    }

    /// How long ago it was stored.
    pub fn age(&self) -> Duration {
        let age = OffsetDateTime::now_utc() - self.stored_at;
        age.try_into().unwrap_or(Duration::ZERO)
    }
}

/// Which dead letters to list or redrive. Empty = all.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this consumer.
    pub consumer: Option<String>,
    /// Only this aggregate category.
    pub category: Option<String>,
    /// Only reasons containing this text (case-insensitive).
    pub reason: Option<String>,
}

/// Counts per consumer and category.
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    /// The consumer.
    pub consumer: String,
    /// The category.
    pub category: String,
    /// Dead letters in the group.
    pub count: usize,
    /// Age of the oldest one, in seconds.
    pub oldest_age_secs: u64,
}

/// The result of [`list`] (serialisable as is for the HTTP API).
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    /// Matching dead letters, oldest first.
    pub entries: Vec<DeadLetter>,
    /// Counts per consumer and category.
    pub groups: Vec<Group>,
}

impl Listing {
    /// How many dead letters matched.
    pub fn count(&self) -> usize {
        self.entries.len()
    }

    /// Age of the oldest matching dead letter.
    pub fn oldest_age(&self) -> Option<Duration> {
        self.entries.iter().map(DeadLetter::age).max()
    }
}

/// Ensures the DLQ streams exist (operator commands may run before any worker).
async fn dlq_stream(store: &EventStore) -> Result<stream::Stream, Error> {
    ensure_all(store, 1).await?;
    store
        .stream_named(DLQ_STREAM)
        .await
        .map_err(|e| Error::nats("opening the DLQ stream", e))
}

async fn scan(store: &EventStore, filter: &Filter) -> Result<Vec<DeadLetter>, Error> {
    let consumer = filter.consumer.as_deref().unwrap_or("*");
    let category = filter.category.as_deref().unwrap_or("*");
    if consumer != "*" {
        validate_token("consumer", consumer)?;
    }
    if category != "*" {
        validate_token("category", category)?;
    }
    let stream = dlq_stream(store).await?;
    let ordered = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("{DLQ_PREFIX}.{consumer}.{category}"),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::nats("reading the DLQ", e))?;
    let pending = ordered.cached_info().num_pending;
    let mut out = Vec::new();
    if pending == 0 {
        return Ok(out);
    }
    let mut messages = ordered
        .messages()
        .await
        .map_err(|e| Error::nats("reading the DLQ", e))?;
    let needle = filter.reason.as_ref().map(|r| r.to_lowercase());
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .map_err(|_| Error::nats("reading the DLQ", "timed out"))?;
        let Some(m) = next else { break };
        let m = m.map_err(|e| Error::nats("reading the DLQ", e))?;
        let info = m.info().map_err(|e| Error::nats("reading the DLQ", e))?;
        let (id, left, at) = (info.stream_sequence, info.pending, info.published);
        let entry = DeadLetter::parse(id, at, m.headers.as_ref(), m.payload.clone());
        match entry {
            Ok(e) => {
                let keep = needle
                    .as_ref()
                    .is_none_or(|n| e.reason.to_lowercase().contains(n.as_str()));
                if keep {
                    out.push(e);
                }
            }
            Err(e) => tracing::warn!(dlq_id = id, error = %e, "skipping a malformed dead letter"),
        }
        if left == 0 {
            break;
        }
    }
    Ok(out)
}

/// Lists dead letters matching `filter`, with counts and oldest age per
/// consumer and category.
pub async fn list(store: &EventStore, filter: &Filter) -> Result<Listing, Error> {
    let entries = scan(store, filter).await?;
    let mut groups: BTreeMap<(String, String), Group> = BTreeMap::new();
    for e in &entries {
        let g = groups
            .entry((e.consumer.clone(), e.category.clone()))
            .or_insert_with(|| Group {
                consumer: e.consumer.clone(),
                category: e.category.clone(),
                count: 0,
                oldest_age_secs: 0,
            });
        g.count += 1;
        g.oldest_age_secs = g.oldest_age_secs.max(e.age().as_secs());
    }
    Ok(Listing {
        entries,
        groups: groups.into_values().collect(),
    })
}

/// One dead letter with headers, body and reason. A by-reference dead
/// letter gets the original's body (and headers it lacks) from the log.
pub async fn show(store: &EventStore, id: u64) -> Result<DeadLetter, Error> {
    // Stream sequences start at 1; the server answers 0 with a request
    // error, which is no reason to report trouble.
    if id == 0 {
        return Err(Error::NotFound(id));
    }
    let stream = dlq_stream(store).await?;
    let m = match stream.get_raw_message(id).await {
        Ok(m) => m,
        Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {
            return Err(Error::NotFound(id));
        }
        Err(e) => return Err(Error::nats("reading a dead letter", e)),
    };
    let mut entry = DeadLetter::parse(id, m.time, Some(&m.headers), m.payload)?;
    if entry.by_reference
        && let Some((headers, body)) = resolve_reference(store, &m.headers).await?
    {
        for (name, values) in headers.iter() {
            let name: &str = name.as_ref();
            entry
                .headers
                .entry(name.to_owned())
                .or_insert_with(|| values.iter().map(|v| v.as_str().to_owned()).collect());
        }
        let get = |n: &str| headers.get(n).map(|v| v.as_str().to_owned());
        entry.event_type = entry.event_type.or_else(|| get("ce-type"));
        entry.event_id = entry.event_id.or_else(|| get("ce-id"));
        entry.body = body;
    }
    Ok(entry)
}

/// What [`redrive`] hands back.
#[derive(Debug, Clone)]
pub enum RedriveTarget {
    /// One dead letter, with everything parked behind it (same aggregate and
    /// consumer). Refused when it is itself parked behind an earlier one.
    Id(u64),
    /// Dead letters of one consumer, optionally one category, oldest first.
    Consumer {
        /// The consumer.
        consumer: String,
        /// Only this category.
        category: Option<String>,
        /// At most this many.
        limit: Option<usize>,
    },
}

/// What a redrive did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RedriveReport {
    /// Dead letters handed back to their consumer now.
    pub redriven: Vec<u64>,
    /// Dead letters that an earlier redrive had already handed back.
    pub already_redriven: Vec<u64>,
}

#[derive(Serialize)]
struct AuditRecord<'a> {
    action: &'a str,
    id: u64,
    consumer: &'a str,
    subject: &'a str,
    stream: &'a str,
    sequence: u64,
    reason: &'a str,
    at: String,
}

async fn audit(
    store: &EventStore,
    action: &str,
    entry: &DeadLetter,
    reason: &str,
) -> Result<(), Error> {
    let record = AuditRecord {
        action,
        id: entry.id,
        consumer: &entry.consumer,
        subject: &entry.subject,
        stream: &entry.stream,
        sequence: entry.sequence,
        reason,
        at: now_rfc3339(),
    };
    let body =
        serde_json::to_vec(&record).map_err(|e| Error::nats("writing an audit record", e))?;
    let mut hm = HeaderMap::new();
    hm.insert(h::MSG_ID, format!("{action}:{}", entry.id).as_str());
    store
        .publish_to(
            format!("{AUDIT_PREFIX}.{}.{}", entry.consumer, entry.id),
            hm,
            body.into(),
        )
        .await
        .map_err(|e| Error::nats("writing an audit record", e))?
        .await
        .map_err(|e| Error::nats("writing an audit record", e))?;
    Ok(())
}

/// The audit records of one dead letter (`redrive`, `discard`), oldest first.
pub async fn audit_trail(store: &EventStore, id: u64) -> Result<Vec<serde_json::Value>, Error> {
    ensure_all(store, 1).await?;
    let stream = store
        .stream_named(AUDIT_STREAM)
        .await
        .map_err(|e| Error::nats("opening the audit stream", e))?;
    let ordered = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("{AUDIT_PREFIX}.*.{id}"),
            ..Default::default()
        })
        .await
        .map_err(|e| Error::nats("reading the audit stream", e))?;
    let mut out = Vec::new();
    if ordered.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = ordered
        .messages()
        .await
        .map_err(|e| Error::nats("reading the audit stream", e))?;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
        let m = m.map_err(|e| Error::nats("reading the audit stream", e))?;
        if let Ok(v) = serde_json::from_slice(&m.payload) {
            out.push(v);
        }
        let left = m.info().map(|i| i.pending).unwrap_or(0);
        if left == 0 {
            break;
        }
    }
    Ok(out)
}

/// The other dead letters of the same aggregate and consumer, oldest first.
async fn same_aggregate(store: &EventStore, entry: &DeadLetter) -> Result<Vec<DeadLetter>, Error> {
    let all = scan(
        store,
        &Filter {
            consumer: Some(entry.consumer.clone()),
            category: Some(entry.category.clone()),
            reason: None,
        },
    )
    .await?;
    let mut same: Vec<DeadLetter> = all
        .into_iter()
        .filter(|e| e.subject == entry.subject)
        .collect();
    same.sort_by_key(|e| (e.sequence, e.id));
    Ok(same)
}

/// Hands dead letters back to the consumer that failed on them, in original
/// order per aggregate. Never appends to `EVENTS`. Idempotent.
pub async fn redrive(store: &EventStore, target: RedriveTarget) -> Result<RedriveReport, Error> {
    let mut report = RedriveReport::default();
    let batch = match target {
        RedriveTarget::Id(id) => {
            let entry = match show(store, id).await {
                Ok(e) => e,
                Err(Error::NotFound(id)) => {
                    let trail = audit_trail(store, id).await?;
                    if trail.iter().any(|r| r["action"] == "redrive") {
                        report.already_redriven.push(id);
                        return Ok(report);
                    }
                    return Err(Error::NotFound(id));
                }
                Err(e) => return Err(e),
            };
            let same = same_aggregate(store, &entry).await?;
            if let Some(head) = same.first()
                && head.sequence < entry.sequence
            {
                return Err(Error::NotHead { id, head: head.id });
            }
            same.into_iter()
                .filter(|e| e.sequence >= entry.sequence)
                .collect()
        }
        RedriveTarget::Consumer {
            consumer,
            category,
            limit,
        } => {
            let mut all = scan(
                store,
                &Filter {
                    consumer: Some(consumer),
                    category,
                    reason: None,
                },
            )
            .await?;
            // Original order: the stream sequence orders every aggregate.
            all.sort_by_key(|e| (e.sequence, e.id));
            all.truncate(limit.unwrap_or(usize::MAX));
            all
        }
    };
    hand_back(store, batch, &mut report).await?;
    Ok(report)
}

/// Hands back every dead letter of one aggregate for one consumer (the
/// worker continues a redrive this way when events were parked meanwhile).
pub(crate) async fn redrive_aggregate(
    store: &EventStore,
    consumer: &str,
    subject: &str,
) -> Result<RedriveReport, Error> {
    let mut all = scan(
        store,
        &Filter {
            consumer: Some(consumer.to_owned()),
            category: Some(category_of(subject)),
            reason: None,
        },
    )
    .await?;
    all.retain(|e| e.subject == subject);
    let mut report = RedriveReport::default();
    hand_back(store, all, &mut report).await?;
    Ok(report)
}

async fn hand_back(
    store: &EventStore,
    mut batch: Vec<DeadLetter>,
    report: &mut RedriveReport,
) -> Result<(), Error> {
    batch.sort_by_key(|e| (e.sequence, e.id));
    let stream = dlq_stream(store).await?;
    for (i, entry) in batch.iter().enumerate() {
        let last_of_aggregate = batch[i + 1..].iter().all(|e| e.subject != entry.subject);
        let mut hm = HeaderMap::new();
        for (name, values) in &entry.headers {
            if name.eq_ignore_ascii_case(h::MSG_ID) {
                continue;
            }
            for v in values {
                hm.append(name.as_str(), v.as_str());
            }
        }
        hm.insert(h::REDRIVE_OF, entry.id.to_string().as_str());
        if last_of_aggregate {
            hm.insert(h::REDRIVE_LAST, "1");
        }
        // The dedup id makes a repeated redrive (say, after a crash between
        // this publish and the delete below) hand the message back once.
        hm.insert(h::MSG_ID, format!("redrive:{}", entry.id).as_str());
        store
            .publish_to(
                format!("{REDRIVE_PREFIX}.{}", entry.consumer),
                hm,
                entry.body.clone(),
            )
            .await
            .map_err(|e| Error::nats("redriving a dead letter", e))?
            .await
            .map_err(|e| Error::nats("redriving a dead letter", e))?;
        audit(store, "redrive", entry, "").await?;
        stream
            .delete_message(entry.id)
            .await
            .map_err(|e| Error::nats("removing a redriven dead letter", e))?;
        tracing::info!(dlq_id = entry.id, consumer = %entry.consumer, subject = %entry.subject, sequence = entry.sequence, "redriven");
        report.redriven.push(entry.id);
    }
    Ok(())
}

/// Removes a dead letter whose fate its consumer has settled elsewhere (a
/// projection applied it, or dropped it from its own records), with an
/// audit record of `action` (`redrive` or `discard`) and `reason`. Parked
/// state is the caller's. Removing one that is already gone is not an error.
pub async fn remove(
    store: &EventStore,
    entry: &DeadLetter,
    action: &str,
    reason: &str,
) -> Result<(), Error> {
    audit(store, action, entry, reason).await?;
    let stream = dlq_stream(store).await?;
    match stream.delete_message(entry.id).await {
        Ok(_) => {}
        Err(e)
            if matches!(e.kind(), stream::DeleteMessageErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND) => {}
        Err(e) => return Err(Error::nats("removing a dead letter", e)),
    }
    tracing::info!(dlq_id = entry.id, consumer = %entry.consumer, subject = %entry.subject, action, reason, "dead letter removed");
    Ok(())
}

/// Ensures the `DLQ` stream exists (a projection runner calls it before it
/// may need to dead-letter). Only that stream: a projector's NATS user may
/// not look at the workers' redrive and advisory streams.
pub async fn ensure_streams(store: &EventStore, replicas: usize) -> Result<(), Error> {
    crate::infra::ensure_dlq_stream(store, replicas).await
}

/// Removes a dead letter for good, keeping `reason` in the audit log. When it
/// was the head of a parked aggregate, the next parked one becomes the head;
/// when nothing of the aggregate is left, the aggregate is released.
pub async fn discard(store: &EventStore, id: u64, reason: &str) -> Result<DeadLetter, Error> {
    if reason.trim().is_empty() {
        return Err(Error::MissingReason);
    }
    let entry = show(store, id).await?;
    let rest: Vec<DeadLetter> = same_aggregate(store, &entry)
        .await?
        .into_iter()
        .filter(|e| e.id != id)
        .collect();
    audit(store, "discard", &entry, reason).await?;
    let stream = dlq_stream(store).await?;
    stream
        .delete_message(id)
        .await
        .map_err(|e| Error::nats("removing a discarded dead letter", e))?;
    if let Ok(stream_id) = StreamId::from_subject("events", &entry.subject) {
        let kv = ensure_parked_bucket(store, 1).await?;
        let parks = Parks::uncached(kv, &entry.consumer);
        match rest.first() {
            None => parks.release(&stream_id).await?,
            Some(next) if next.sequence > entry.sequence => {
                parks.move_head(&stream_id, next.sequence).await?;
            }
            Some(_) => {}
        }
    }
    tracing::info!(dlq_id = id, consumer = %entry.consumer, subject = %entry.subject, reason, "discarded");
    Ok(entry)
}

/// The parked state of an aggregate for a consumer, if parked.
pub async fn parked(
    store: &EventStore,
    consumer: &str,
    stream_id: &StreamId,
) -> Result<Option<crate::park::Parked>, Error> {
    validate_token("consumer", consumer)?;
    let kv = ensure_parked_bucket(store, 1).await?;
    Parks::uncached(kv, consumer).get(stream_id).await
}
