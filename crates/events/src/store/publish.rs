//! The write path: one append (or one group of appends) to JetStream as a
//! single publish or one atomic batch, with the dedup and expected-version
//! headers, the server's answer decoded, and every doubtful answer (a
//! duplicate id, a wrong last sequence) resolved into an exact outcome.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use serde::Deserialize;

use super::config::{MAX_BATCH, StoreConfig};
use super::stats::Counters;
use super::types::{AppendResult, ExpectedVersion};
use super::{read, stream as log};
use crate::envelope::{H_MSG_ID, H_TYPE, NewEvent};
use crate::error::Error;
use crate::ids::{EventId, StreamId};

/// JetStream API error code for "wrong last sequence".
const ERR_WRONG_LAST_SEQUENCE: u64 = 10071;
/// JetStream API error code for "atomic publish batch contains duplicate message id".
const ERR_BATCH_DUPLICATE_MSG_ID: u64 = 10201;
/// JetStream API error code for "atomic publish is disabled" (on the stream).
const ERR_ATOMIC_PUBLISH_DISABLED: u64 = 10174;
/// Rounds an append goes out again when the server refused it for an id it
/// no longer remembers by the time Sluice looked (the window just ended).
const MAX_FORGOTTEN_ROUNDS: usize = 3;
/// Estimated bytes a message adds to a batch beyond data and envelope
/// headers: subject, batch headers, expectation, protocol framing.
const BATCH_MESSAGE_OVERHEAD: usize = 192;

const H_EXPECTED_LAST_SUBJECT_SEQ: &str = "Nats-Expected-Last-Subject-Sequence";
const H_BATCH_ID: &str = "Nats-Batch-Id";
const H_BATCH_SEQ: &str = "Nats-Batch-Sequence";
const H_BATCH_COMMIT: &str = "Nats-Batch-Commit";

/// One validated, encoded append on its way to the server.
#[derive(Debug)]
pub(super) struct Append {
    pub(super) stream_id: StreamId,
    pub(super) subject: String,
    pub(super) expected: ExpectedVersion,
    /// The validated events; their headers are built per publish attempt,
    /// which costs no more than cloning prebuilt ones.
    pub(super) events: Vec<NewEvent>,
    /// Estimated wire size: data, headers and batch headers.
    pub(super) bytes: usize,
}

/// What the write path needs: the connection, the stream, the settings, and
/// what it has learnt and counted. Shared by the store and its group-commit
/// dispatcher.
pub(super) struct Publisher {
    pub(super) client: async_nats::Client,
    pub(super) js: jetstream::Context,
    pub(super) stream: stream::Stream,
    pub(super) config: StoreConfig,
    /// Set when the stream refuses atomic batches: appends then go one by one.
    atomic_disabled: AtomicBool,
    pub(super) counters: Counters,
}

/// Why one publish attempt failed.
#[derive(Debug)]
pub(super) enum Attempt {
    WrongLast,
    /// The server already holds one of the batch's event ids.
    Duplicate,
    /// The stream does not allow atomic batches.
    AtomicDisabled,
    Transient(String),
    Fatal(Error),
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
struct BatchAck {
    #[serde(default)]
    error: Option<ApiError>,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    count: u64,
}

/// One message of an atomic batch, before its headers are built.
struct BatchMessage<'a> {
    subject: &'a str,
    /// The aggregate id (`ce-subject`).
    aggregate: &'a str,
    event: &'a NewEvent,
    /// `Nats-Expected-Last-Subject-Sequence`, on an append's first message.
    expected: Option<u64>,
}

impl Publisher {
    pub(super) fn new(
        client: async_nats::Client,
        js: jetstream::Context,
        stream: stream::Stream,
        config: StoreConfig,
    ) -> Self {
        Self {
            client,
            js,
            stream,
            config,
            atomic_disabled: AtomicBool::new(false),
            counters: Counters::default(),
        }
    }

    /// Validates the events and turns them into messages, before anything
    /// reaches NATS.
    pub(super) fn encode(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Append, Error> {
        let cfg = &self.config;
        if events.is_empty() {
            return Err(Error::EmptyAppend);
        }
        if events.len() > MAX_BATCH {
            return Err(Error::TooManyEvents {
                count: events.len(),
                limit: MAX_BATCH,
            });
        }
        for e in &events {
            e.validate(cfg.max_payload)?;
        }
        if events.len() > 1 {
            let mut seen = std::collections::HashSet::with_capacity(events.len());
            if let Some(twice) = events.iter().find(|e| !seen.insert(e.id.as_str())) {
                return Err(Error::DuplicateEventId(twice.id.to_string()));
            }
        }
        let subject = stream_id.subject(&cfg.subject_prefix);
        let bytes = events
            .iter()
            .map(|e| {
                e.data.len()
                    + e.headers_len(stream_id.id())
                    + subject.len()
                    + BATCH_MESSAGE_OVERHEAD
            })
            .sum();
        Ok(Append {
            stream_id: stream_id.clone(),
            subject,
            expected,
            events,
            bytes,
        })
    }

    /// True once the stream refused an atomic batch.
    pub(super) fn atomic_disabled(&self) -> bool {
        self.atomic_disabled.load(Ordering::Relaxed)
    }

    /// Remembers that the stream refuses atomic batches, so appends go one
    /// by one from now on; warns once.
    pub(super) fn disable_atomic(&self) {
        if !self.atomic_disabled.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                stream = %self.config.stream,
                "the stream does not allow atomic publish: group commit falls back to one write per append, and multi-event appends fail; set allow_atomic_publish on the stream"
            );
        }
    }

    fn retry_policy(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(self.config.max_attempts.saturating_sub(1))
            .with_jitter()
    }

    /// One append on its own, with an exact outcome: one publish, or one
    /// atomic batch for several events.
    pub(super) async fn append_direct(&self, append: &Append) -> Result<AppendResult, Error> {
        let cfg = &self.config;
        let Append {
            stream_id,
            subject,
            events,
            ..
        } = append;
        // A batch is retried as a whole; with `Any` the server cannot tell a
        // retried batch from a new one, so pin the expectation to what we read
        // and let the wrong-last-sequence path recognise our own earlier write.
        let mut expected = append.expected;
        let any_batch = expected == ExpectedVersion::Any && events.len() > 1;
        let mut any_rounds = 0;
        let mut forgotten_rounds = 0;
        loop {
            if any_batch {
                expected = ExpectedVersion::from_version(self.last_version_of(subject).await?);
            }
            let exp = expected.as_sequence();
            let attempt = || async {
                if let [event] = events.as_slice() {
                    self.publish_one(subject, stream_id.id(), exp, event).await
                } else {
                    self.publish_batch(subject, stream_id.id(), exp, events)
                        .await
                }
            };
            let result = attempt
                .retry(self.retry_policy())
                .when(|e| matches!(e, Attempt::Transient(_)))
                .notify(|e, dur| {
                    tracing::warn!(subject = %subject, error = ?e, retry_in = ?dur, "append attempt failed; retrying with the same event ids");
                })
                .await;
            let outcome = match result {
                // The server answers a known id with the sequence of the
                // event holding it, wherever that is: only the same event on
                // the same aggregate makes this a retry that had landed.
                Ok(r) if r.deduplicated => match (events.as_slice(), r.positions.as_slice()) {
                    ([event], [seq]) => {
                        self.verify_duplicate(stream_id, subject, event, *seq).await
                    }
                    _ => Ok(r),
                },
                Ok(r) => Ok(r),
                Err(Attempt::WrongLast) => {
                    let exp = exp.unwrap_or(0);
                    match self
                        .resolve_wrong_last(stream_id, subject, exp, events)
                        .await?
                    {
                        Ok(r) => Ok(r),
                        Err(e) if e.is_conflict() && any_batch && any_rounds < 10 => {
                            any_rounds += 1;
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                }
                Err(Attempt::Duplicate) => {
                    match self.resolve_duplicate(stream_id, subject, events).await? {
                        Duplicate::Landed(r) => Ok(r),
                        Duplicate::Reused(e) => Err(e),
                        Duplicate::Forgotten if forgotten_rounds < MAX_FORGOTTEN_ROUNDS => {
                            forgotten_rounds += 1;
                            continue;
                        }
                        Duplicate::Forgotten => {
                            Err(self.id_reused(stream_id, &events[0].id, None, None))
                        }
                    }
                }
                Err(Attempt::AtomicDisabled) => {
                    self.disable_atomic();
                    Err(Error::Rejected {
                        code: ERR_ATOMIC_PUBLISH_DISABLED,
                        description: format!(
                            "stream {} does not allow atomic publish, which appends of several events need",
                            cfg.stream
                        ),
                    })
                }
                Err(Attempt::Transient(msg)) => {
                    tracing::error!(subject = %subject, error = %msg, "append gave up after retries");
                    Err(Error::Timeout(cfg.request_timeout))
                }
                Err(Attempt::Fatal(e)) => Err(e),
            };
            if let Ok(r) = &outcome
                && !r.deduplicated
            {
                self.counters.committed(1, r.positions.len());
            }
            return outcome;
        }
    }

    async fn publish_one(
        &self,
        subject: &str,
        aggregate: &str,
        expected: Option<u64>,
        event: &NewEvent,
    ) -> Result<AppendResult, Attempt> {
        let mut headers = event.headers(aggregate);
        if let Some(v) = expected {
            headers.insert(H_EXPECTED_LAST_SUBJECT_SEQ, v.to_string());
        }
        let ack = self
            .js
            .publish_with_headers(subject.to_owned(), headers, event.data.clone())
            .await
            .map_err(classify_publish)?
            .await
            .map_err(classify_publish)?;
        Ok(AppendResult {
            version: ack.sequence,
            positions: vec![ack.sequence],
            deduplicated: ack.duplicate,
        })
    }

    async fn publish_batch(
        &self,
        subject: &str,
        aggregate: &str,
        expected: Option<u64>,
        events: &[NewEvent],
    ) -> Result<AppendResult, Attempt> {
        let batch: Vec<BatchMessage<'_>> = events
            .iter()
            .enumerate()
            .map(|(i, event)| BatchMessage {
                subject,
                aggregate,
                event,
                expected: if i == 0 { expected } else { None },
            })
            .collect();
        let (seq, count) = self.publish_atomic(&batch).await?;
        let first = seq + 1 - count.max(1);
        Ok(AppendResult {
            version: seq,
            positions: (first..=seq).collect(),
            deduplicated: false,
        })
    }

    /// Writes the appends as one atomic batch, each aggregate's first message
    /// carrying that append's expectation; retries timeouts with the same
    /// event ids. Returns the ack's last sequence and message count.
    pub(super) async fn publish_group(&self, appends: &[&Append]) -> Result<(u64, u64), Attempt> {
        let batch: Vec<BatchMessage<'_>> = appends
            .iter()
            .flat_map(|a| {
                a.events
                    .iter()
                    .enumerate()
                    .map(move |(i, event)| BatchMessage {
                        subject: &a.subject,
                        aggregate: a.stream_id.id(),
                        event,
                        expected: if i == 0 {
                            a.expected.as_sequence()
                        } else {
                            None
                        },
                    })
            })
            .collect();
        (|| self.publish_atomic(&batch))
            .retry(self.retry_policy())
            .when(|e| matches!(e, Attempt::Transient(_)))
            .notify(|e, dur| {
                tracing::warn!(appends = appends.len(), messages = batch.len(), error = ?e, retry_in = ?dur, "batch attempt failed; retrying with the same event ids");
            })
            .await
    }

    /// Sends one atomic batch: every message but the last as a plain
    /// publish, the last as the commit request whose reply is the outcome of
    /// the whole batch.
    async fn publish_atomic(&self, messages: &[BatchMessage<'_>]) -> Result<(u64, u64), Attempt> {
        // A fresh batch id per attempt: the server may still hold the staged
        // remains of a failed attempt under the old one.
        let batch_id = uuid::Uuid::now_v7().simple().to_string();
        let client = &self.client;
        let last = messages.len();
        for (i, m) in messages.iter().enumerate() {
            let mut h = m.event.headers(m.aggregate);
            h.insert(H_BATCH_ID, batch_id.as_str());
            h.insert(H_BATCH_SEQ, (i + 1).to_string().as_str());
            if let Some(v) = m.expected {
                h.insert(H_EXPECTED_LAST_SUBJECT_SEQ, v.to_string().as_str());
            }
            if i + 1 < last {
                client
                    .publish_with_headers(m.subject.to_owned(), h, m.event.data.clone())
                    .await
                    .map_err(|e| Attempt::Transient(e.to_string()))?;
            } else {
                h.insert(H_BATCH_COMMIT, "1");
                let request = async_nats::Request::new()
                    .headers(h)
                    .payload(m.event.data.clone())
                    .timeout(Some(self.config.request_timeout));
                let reply = client
                    .send_request(m.subject.to_owned(), request)
                    .await
                    .map_err(|e| Attempt::Transient(e.to_string()))?;
                let ack: BatchAck = serde_json::from_slice(&reply.payload)
                    .map_err(|e| Attempt::Transient(format!("unreadable batch ack: {e}")))?;
                if let Some(err) = ack.error {
                    return Err(match err.err_code {
                        ERR_WRONG_LAST_SEQUENCE => Attempt::WrongLast,
                        ERR_BATCH_DUPLICATE_MSG_ID => Attempt::Duplicate,
                        ERR_ATOMIC_PUBLISH_DISABLED => Attempt::AtomicDisabled,
                        code => Attempt::Fatal(Error::Rejected {
                            code,
                            description: err.description,
                        }),
                    });
                }
                return Ok((ack.seq, ack.count));
            }
        }
        Err(Attempt::Fatal(Error::EmptyAppend))
    }

    /// After "wrong last sequence": either a previous try of this very append
    /// landed (the events after `expected` carry our ids) or it is a conflict.
    pub(super) async fn resolve_wrong_last(
        &self,
        stream_id: &StreamId,
        subject: &str,
        expected: u64,
        events: &[NewEvent],
    ) -> Result<Result<AppendResult, Error>, Error> {
        let mut positions = Vec::with_capacity(events.len());
        let mut from = expected + 1;
        for event in events {
            match self
                .stream
                .direct_get_next_for_subject(subject, Some(from))
                .await
            {
                Ok(msg) if msg_id(&msg.headers) == Some(event.id.as_str()) => {
                    if !is_same_event(subject, event, &msg.subject, &msg.headers, &msg.payload) {
                        return Ok(Err(self.id_reused(
                            stream_id,
                            &event.id,
                            Some(subject),
                            Some(msg.sequence),
                        )));
                    }
                    positions.push(msg.sequence);
                    from = msg.sequence + 1;
                }
                Ok(_) => break,
                Err(e) if matches!(e.kind(), stream::DirectGetErrorKind::NotFound) => break,
                Err(e) => return Err(Error::DirectGet(e)),
            }
        }
        if positions.len() == events.len() {
            tracing::debug!(subject, "append was a retry of one that had landed");
            return Ok(Ok(AppendResult {
                version: *positions.last().unwrap_or(&expected),
                positions,
                deduplicated: true,
            }));
        }
        let actual = self.last_version_of(subject).await?;
        Ok(Err(Error::Conflict {
            stream: stream_id.to_string(),
            expected,
            actual,
        }))
    }

    /// Finds where an earlier try of this append landed: the same events,
    /// in order, among the aggregate's events within the dedup window (the
    /// server only rejects ids it remembers, so they are in there).
    pub(super) async fn find_landed(
        &self,
        subject: &str,
        events: &[NewEvent],
    ) -> Result<Option<AppendResult>, Error> {
        let last = self.last_version_of(subject).await?;
        let found = self.scan_window(subject, last, events, false).await?;
        Ok(landed(&found))
    }

    /// A single event's publish came back "duplicate" with the position of
    /// the event holding its id: a retry that had landed only when that
    /// event is this one, on this aggregate.
    async fn verify_duplicate(
        &self,
        stream_id: &StreamId,
        subject: &str,
        event: &NewEvent,
        position: u64,
    ) -> Result<AppendResult, Error> {
        let stored = self
            .stream
            .direct_get(position)
            .await
            .map_err(Error::DirectGet)?;
        if is_same_event(
            subject,
            event,
            &stored.subject,
            &stored.headers,
            &stored.payload,
        ) {
            tracing::debug!(
                subject,
                position,
                "append was a retry of one that had landed"
            );
            Ok(AppendResult {
                version: position,
                positions: vec![position],
                deduplicated: true,
            })
        } else {
            Err(self.id_reused(stream_id, &event.id, Some(&stored.subject), Some(position)))
        }
    }

    /// After "batch contains duplicate message id" (10201), which does not
    /// say which id nor where: a retry of this append that had landed (all
    /// its events, in order, on this aggregate), or an id naming another
    /// event, here or on another aggregate (searched within the window).
    async fn resolve_duplicate(
        &self,
        stream_id: &StreamId,
        subject: &str,
        events: &[NewEvent],
    ) -> Result<Duplicate, Error> {
        let last = self.last_version_of(subject).await?;
        let own = self.scan_window(subject, last, events, false).await?;
        if let Some(r) = landed(&own) {
            tracing::debug!(subject, "append was a retry of one that had landed");
            return Ok(Duplicate::Landed(r));
        }
        if let Some((i, f)) = first_found(&own) {
            return Ok(Duplicate::Reused(self.id_reused(
                stream_id,
                &events[i].id,
                Some(&f.subject),
                Some(f.position),
            )));
        }
        let head = log::head(&self.stream).await?;
        let filter = format!("{}.>", self.config.subject_prefix);
        let anywhere = self.scan_window(&filter, head, events, true).await?;
        Ok(match first_found(&anywhere) {
            Some((i, f)) => Duplicate::Reused(self.id_reused(
                stream_id,
                &events[i].id,
                Some(&f.subject),
                Some(f.position),
            )),
            None => Duplicate::Forgotten,
        })
    }

    /// Where the events with the ids of `events` are among the messages on
    /// `filter` stored within the duplicate window, up to position `last`
    /// (found per event, in the order of `events`). The scan stops early
    /// once all are found, and gives up after the request timeout: it only
    /// runs when the server reported a duplicate.
    async fn scan_window(
        &self,
        filter: &str,
        last: u64,
        events: &[NewEvent],
        headers_only: bool,
    ) -> Result<Vec<Option<Found>>, Error> {
        let mut found: Vec<Option<Found>> = vec![None; events.len()];
        if last == 0 {
            return Ok(found);
        }
        let index: std::collections::HashMap<&str, usize> = events
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id.as_str(), i))
            .collect();
        let since = time::OffsetDateTime::now_utc()
            - self.config.duplicate_window
            - Duration::from_secs(10);
        let consumer = self
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter.to_owned(),
                deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time: since },
                headers_only,
                ..Default::default()
            })
            .await
            .map_err(Error::CreateReader)?;
        let mut messages = consumer.messages().await.map_err(Error::OpenReader)?;
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let idle = self.config.request_timeout.min(Duration::from_secs(1));
        let mut missing = events.len();
        while missing > 0 {
            let wait = idle.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            // Nothing more within the window (or out of time): what was
            // found is the answer.
            let Ok(Some(m)) = tokio::time::timeout(wait, messages.next()).await else {
                break;
            };
            let m = m.map_err(Error::Read)?;
            let seq = m.info().map_err(Error::MessageInfo)?.stream_sequence;
            if let Some(headers) = m.headers.as_ref()
                && let Some(&i) = msg_id(headers).and_then(|id| index.get(id))
                && found[i].is_none()
            {
                let subject = m.subject.to_string();
                let same = !headers_only
                    && is_same_event(&subject, &events[i], &subject, headers, &m.payload);
                found[i] = Some(Found {
                    position: seq,
                    subject,
                    same,
                });
                missing -= 1;
            }
            if seq >= last {
                break;
            }
        }
        Ok(found)
    }

    /// [`Error::IdReused`] for `id` of an append to `stream_id`, naming the
    /// event that holds it when known.
    fn id_reused(
        &self,
        stream_id: &StreamId,
        id: &EventId,
        existing_subject: Option<&str>,
        existing_position: Option<u64>,
    ) -> Error {
        let existing_stream = existing_subject.map(|s| {
            StreamId::from_subject(&self.config.subject_prefix, s)
                .map(|x| x.to_string())
                .unwrap_or_else(|_| s.to_owned())
        });
        tracing::debug!(id = %id, stream = %stream_id, ?existing_stream, ?existing_position, "event id already names another event");
        Error::IdReused {
            id: id.to_string(),
            stream: stream_id.to_string(),
            existing_stream,
            existing_position,
        }
    }

    /// The aggregate's version on `subject` (0 when it has no events).
    pub(super) async fn last_version_of(&self, subject: &str) -> Result<u64, Error> {
        read::last_version_of(&self.stream, subject).await
    }
}

fn msg_id(headers: &HeaderMap) -> Option<&str> {
    headers.get(H_MSG_ID).map(async_nats::HeaderValue::as_str)
}

/// What became of an append the server refused for a known id.
enum Duplicate {
    /// It was a retry: all its events are stored, in order, on its aggregate.
    Landed(AppendResult),
    /// An id names another event.
    Reused(Error),
    /// No event with its ids was found within the window: the server's
    /// memory of them ended meanwhile; it may go out again.
    Forgotten,
}

/// An event found by id in the log.
#[derive(Debug, Clone)]
struct Found {
    position: u64,
    subject: String,
    /// Same aggregate, type and data as the event looked for.
    same: bool,
}

/// Whether the stored message (`stored_subject`, headers, payload) is
/// `event` appended to `subject`: same id, aggregate, type and data. Source,
/// time and trace context may differ between tries of one append.
fn is_same_event(
    subject: &str,
    event: &NewEvent,
    stored_subject: &str,
    headers: &HeaderMap,
    payload: &[u8],
) -> bool {
    stored_subject == subject
        && msg_id(headers) == Some(event.id.as_str())
        && headers.get(H_TYPE).map(async_nats::HeaderValue::as_str)
            == Some(event.event_type.as_str())
        && payload == &event.data[..]
}

/// The append's earlier try, when every event was found unchanged, in order.
fn landed(found: &[Option<Found>]) -> Option<AppendResult> {
    let positions: Vec<u64> = found
        .iter()
        .map(|f| f.as_ref().filter(|f| f.same).map(|f| f.position))
        .collect::<Option<_>>()?;
    if positions.is_empty() || positions.windows(2).any(|w| w[0] >= w[1]) {
        return None;
    }
    Some(AppendResult {
        version: *positions.last()?,
        positions,
        deduplicated: true,
    })
}

/// The first event found, by index in the append.
fn first_found(found: &[Option<Found>]) -> Option<(usize, &Found)> {
    found
        .iter()
        .enumerate()
        .find_map(|(i, f)| f.as_ref().map(|f| (i, f)))
}

fn classify_publish(e: async_nats::jetstream::context::PublishError) -> Attempt {
    match e.kind() {
        PublishErrorKind::WrongLastSequence => Attempt::WrongLast,
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
            Attempt::Transient(e.to_string())
        }
        PublishErrorKind::StreamNotFound => Attempt::Transient(format!(
            "{e} (no stream answered; is the server up and the stream created?)"
        )),
        _ => Attempt::Transient(e.to_string()),
    }
}
