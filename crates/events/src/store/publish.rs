//! The event store on JetStream: one stream (`EVENTS`), one subject per
//! aggregate, optimistic concurrency on the per-subject last sequence.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use futures::stream::BoxStream;
use serde::Deserialize;

use super::group_commit::{
    Append, Appender, Counters, GroupCommitConfig, GroupCommitStats, Pending,
};
use crate::DEFAULT_MAX_PAYLOAD;
use crate::connect::ConnectConfig;
use crate::envelope::{Envelope, H_MSG_ID, H_TYPE, NewEvent};
use crate::error::Error;
use crate::ids::{EventId, StreamId};
use crate::server::{ServerVersion, check_server_version};

/// Name of the stream holding every domain event.
pub const EVENTS_STREAM: &str = "EVENTS";
/// The server's limit on messages in one atomic batch.
pub(crate) const MAX_BATCH: usize = 1000;
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

/// What the caller believes about the aggregate's current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// No check: append whatever the version is.
    Any,
    /// The aggregate must have no events yet.
    NoStream,
    /// The aggregate's last event must be at this stream sequence.
    Exact(u64),
}

impl ExpectedVersion {
    /// The version as the server checks it (0 = no stream), if any check.
    pub(crate) fn as_sequence(self) -> Option<u64> {
        match self {
            ExpectedVersion::Any => None,
            ExpectedVersion::NoStream => Some(0),
            ExpectedVersion::Exact(v) => Some(v),
        }
    }

    /// `NoStream` for version 0, else `Exact(version)`.
    pub fn from_version(version: u64) -> Self {
        if version == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(version)
        }
    }
}

/// Where an append landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendResult {
    /// The aggregate's new version (stream sequence of its last event).
    pub version: u64,
    /// Global positions (stream sequences) of the appended events, in order.
    pub positions: Vec<u64>,
    /// True when the events were already there (a retry of an append that
    /// had landed); nothing new was written. Only ever true when the stored
    /// events are these very events: same ids, same aggregate, same types
    /// and data; an id that names another event is [`Error::IdReused`].
    pub deduplicated: bool,
}

/// An event as stored: envelope plus where it lives.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    /// The aggregate it belongs to.
    pub stream_id: StreamId,
    /// Global position (stream sequence); also the aggregate's version after it.
    pub position: u64,
    /// The CloudEvent.
    pub envelope: Envelope,
}

/// An aggregate's events as consumers fold them: voided events left out,
/// the version still the position of its last event (voided or not, since
/// that is what an optimistic append is checked against).
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    /// Its events that are not voided, in order.
    pub events: Vec<RecordedEvent>,
    /// The aggregate's version (0 = no events).
    pub version: u64,
    /// Positions of its voided events.
    pub voided: Vec<u64>,
}

impl RecordedEvent {
    /// The error for this stored event not reading as what it claims to be
    /// (`reason`: the decoder's verdict).
    pub fn invalid(&self, reason: impl std::fmt::Display) -> Error {
        Error::InvalidStoredEvent {
            position: self.position,
            stream: self.stream_id.to_string(),
            event_type: self.envelope.event_type.clone(),
            reason: reason.to_string(),
        }
    }

    /// A decoder's verdict on this event, its error turned into
    /// [`Error::InvalidStoredEvent`] naming the position.
    pub fn decoded<T>(&self, decoded: Result<T, Error>) -> Result<T, Error> {
        decoded.map_err(|e| match e {
            Error::InvalidData(reason) => self.invalid(reason),
            e @ Error::InvalidStoredEvent { .. } => e,
            other => self.invalid(other),
        })
    }
}

/// Settings of the event store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Stream name.
    pub stream: String,
    /// Subject prefix; aggregates live on `<prefix>.<category>.<id>`.
    pub subject_prefix: String,
    /// Replicas of the stream (3 in production).
    pub replicas: usize,
    /// How long the server remembers event ids for dedup.
    pub duplicate_window: Duration,
    /// Largest accepted event data, in bytes.
    pub max_payload: usize,
    /// How long to wait for one server answer.
    pub request_timeout: Duration,
    /// Tries per append on timeouts and broken connections.
    pub max_attempts: usize,
    /// Group commit: concurrent appends share one atomic batch (one fsync).
    pub group_commit: GroupCommitConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            stream: EVENTS_STREAM.to_owned(),
            subject_prefix: "events".to_owned(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_payload: DEFAULT_MAX_PAYLOAD,
            request_timeout: Duration::from_secs(5),
            max_attempts: 5,
            group_commit: GroupCommitConfig::default(),
        }
    }
}

impl StoreConfig {
    /// Longest time an append keeps retrying with the same event ids
    /// (every attempt timing out, plus the capped backoff between them).
    pub fn retry_horizon(&self) -> Duration {
        let attempts = u32::try_from(self.max_attempts.max(1)).unwrap_or(u32::MAX);
        self.request_timeout.saturating_mul(attempts)
            + Duration::from_secs(2).saturating_mul(attempts)
    }

    /// Checks the settings that have limits.
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_attempts == 0 {
            return Err(Error::InvalidConfig("max_attempts must be > 0".to_owned()));
        }
        self.group_commit.validate()
    }
}

/// A snapshot of the stream's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamState {
    /// Events stored.
    pub messages: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// First position.
    pub first_position: u64,
    /// Last position (the head of the log).
    pub last_position: u64,
    /// Replicas configured.
    pub replicas: usize,
    /// Distinct aggregates.
    pub aggregates: u64,
    /// Age limit (zero = none): events older than this are deleted.
    pub max_age: Duration,
    /// Size limit in bytes (-1 = none).
    pub max_bytes: i64,
    /// Message-count limit (-1 = none).
    pub max_messages: i64,
    /// Per-aggregate message limit (-1 or 0 = none).
    pub max_messages_per_subject: i64,
    /// How long the server remembers event ids for dedup.
    pub duplicate_window: Duration,
}

impl StreamState {
    /// Ways the stream could lose or duplicate acknowledged events, for
    /// `sluice status` and the start of `sluice up`/`serve`.
    ///
    /// `sync_always`: whether the server fsyncs every write, when known;
    /// `production`: require replicas >= 3; `retry_horizon`: how long an
    /// append may keep retrying with the same ids.
    pub fn durability_warnings(
        &self,
        sync_always: Option<bool>,
        production: bool,
        retry_horizon: Duration,
    ) -> Vec<String> {
        let mut w = Vec::new();
        match sync_always {
            Some(true) => {}
            Some(false) => w.push(
                "sync_interval is not `always`: acknowledged events can be lost if the machine crashes".to_owned(),
            ),
            None if self.replicas < 3 => w.push(
                "the server's sync_interval is not visible to clients: make sure it is `always` (or run replicas >= 3 across failure domains)".to_owned(),
            ),
            None => {}
        }
        if production && self.replicas < 3 {
            w.push(format!(
                "the event stream has {} replica(s): production needs 3 to survive a node loss",
                self.replicas
            ));
        }
        if !self.max_age.is_zero() {
            w.push(format!(
                "the event stream has max_age {:?}: older events are deleted",
                self.max_age
            ));
        }
        if self.max_bytes > 0 || self.max_messages > 0 {
            w.push("the event stream has a size or message limit: old events are deleted when it is reached".to_owned());
        }
        if self.max_messages_per_subject > 0 {
            w.push(format!(
                "the event stream keeps only {} event(s) per aggregate",
                self.max_messages_per_subject
            ));
        }
        if self.duplicate_window < retry_horizon {
            w.push(format!(
                "the duplicate window ({:?}) is shorter than the append retry horizon ({retry_horizon:?}): a late retry could store an event twice",
                self.duplicate_window
            ));
        }
        w
    }
}

/// What the store and its group-commit dispatcher share.
pub(crate) struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    pub(crate) config: StoreConfig,
    server_version: ServerVersion,
    /// Set when the stream refuses atomic batches: appends then go one by one.
    atomic_disabled: AtomicBool,
    pub(crate) counters: Counters,
    /// The voided positions, loaded on first use (see `void`).
    voided: tokio::sync::OnceCell<crate::void::Voided>,
}

/// The JetStream-backed event store. Cheap to clone.
#[derive(Clone)]
pub struct EventStore {
    inner: Arc<Inner>,
    /// The group-commit queue; `None` when group commit is off. Held only by
    /// the store's clones, so the dispatcher stops once they are all gone.
    appender: Option<Arc<Appender>>,
}

impl std::fmt::Debug for EventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStore")
            .field("stream", &self.inner.config.stream)
            .field("server_version", &self.inner.server_version)
            .finish()
    }
}

/// Why one publish attempt failed.
#[derive(Debug)]
pub(crate) enum Attempt {
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

impl EventStore {
    /// Connects to `url`, checks the server version and ensures the stream.
    pub async fn connect(url: &str, config: StoreConfig) -> Result<Self, Error> {
        Self::connect_with(&ConnectConfig::new(url), config).await
    }

    /// Connects with credentials/TLS, checks the server version and ensures the stream.
    pub async fn connect_with(connect: &ConnectConfig, config: StoreConfig) -> Result<Self, Error> {
        let client = connect.connect().await?;
        Self::new(client, config).await
    }

    /// Uses an existing connection: checks the server version and ensures the stream.
    ///
    /// With group commit on (the default) this starts the dispatcher task on
    /// the current tokio runtime.
    pub async fn new(client: async_nats::Client, config: StoreConfig) -> Result<Self, Error> {
        config.validate()?;
        let server_version = check_server_version(&client)?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(config.request_timeout);
        let stream = ensure_stream(&js, &config).await?;
        let max_payload = client.server_info().max_payload;
        let inner = Arc::new(Inner {
            client,
            js,
            stream,
            config,
            server_version,
            atomic_disabled: AtomicBool::new(false),
            counters: Counters::default(),
            voided: tokio::sync::OnceCell::new(),
        });
        let appender = inner.config.group_commit.enabled.then(|| {
            Arc::new(Appender::start(
                inner.clone(),
                &inner.config.group_commit,
                max_payload,
            ))
        });
        Ok(Self { inner, appender })
    }

    /// What group commit has done so far: batches, events, batch-size
    /// distribution, conflicts resolved, fsyncs saved.
    pub fn group_commit_stats(&self) -> GroupCommitStats {
        self.inner.counters.snapshot(
            &self.inner.config.group_commit,
            self.inner.atomic_disabled(),
        )
    }

    /// The NATS connection (for consumers built on top of the store).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// The store's settings.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// The connected server's version.
    pub fn server_version(&self) -> ServerVersion {
        self.inner.server_version
    }

    /// Appends events to one aggregate, atomically, with an optimistic check.
    ///
    /// With group commit on, concurrent appends to different aggregates
    /// share one atomic batch (one fsync); the outcome reported here is still
    /// this append's own: `Ok` only when its events are stored, `Conflict`
    /// only when its own expectation was stale.
    ///
    /// Retries on timeouts and broken connections with the same event ids, so
    /// an append that landed but whose ack was lost is reported once, never
    /// written twice. Fails with [`Error::Overloaded`] when the append queue
    /// stays full for `group_commit.queue_timeout`.
    pub async fn append(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        mut events: Vec<NewEvent>,
    ) -> Result<AppendResult, Error> {
        let started = std::time::Instant::now();
        // Events carry the context of the span appending them, so whoever
        // handles them continues this trace (see `trace`).
        if events.iter().any(|e| e.traceparent.is_none())
            && let Some(tp) = crate::trace::current()
        {
            for e in events.iter_mut().filter(|e| e.traceparent.is_none()) {
                e.traceparent = Some(tp.clone());
            }
        }
        let result = async {
            let append = self.encode(stream_id, expected, events)?;
            match &self.appender {
                Some(appender) if !self.inner.atomic_disabled() => {
                    appender.submit(&self.inner, append).await
                }
                _ => self.inner.append_direct(&append).await,
            }
        }
        .await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) if e.is_conflict() => "conflict",
            Err(e) if e.is_id_reused() => "id_reused",
            Err(e) if e.is_invalid_input() => "invalid",
            Err(_) => "error",
        };
        metrics::counter!("sluice_appends_total", "outcome" => outcome).increment(1);
        metrics::histogram!("sluice_append_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// Validates the events and turns them into messages, before anything
    /// reaches NATS.
    fn encode(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Append, Error> {
        let cfg = &self.inner.config;
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

    /// The voided positions: loaded on the first call (one ordered
    /// consumer on the void category), then followed live.
    pub async fn voided(&self) -> Result<crate::void::Voided, Error> {
        self.inner
            .voided
            .get_or_try_init(|| crate::void::Voided::load(self))
            .await
            .cloned()
    }

    /// The voided positions, if [`voided`](Self::voided) loaded them already.
    pub fn voided_if_loaded(&self) -> Option<&crate::void::Voided> {
        self.inner.voided.get()
    }

    /// The aggregate's events up to its current version, voided ones left
    /// out; an event that cannot be decoded (and is not voided) is an
    /// [`Error::InvalidStoredEvent`] naming its position.
    pub async fn history(&self, stream_id: &StreamId) -> Result<History, Error> {
        let voided = self.voided().await?;
        let subject = stream_id.subject(&self.inner.config.subject_prefix);
        let last = self.last_version_of(&subject).await?;
        let mut history = History {
            events: Vec::new(),
            version: last,
            voided: Vec::new(),
        };
        if last == 0 {
            return Ok(history);
        }
        let mut messages = self
            .ordered(
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
                history.events.push(self.decode_message(Ok(m))?);
            }
            if position >= last {
                break;
            }
        }
        Ok(history)
    }

    /// The aggregate's current version (0 when it has no events).
    pub async fn last_version(&self, stream_id: &StreamId) -> Result<u64, Error> {
        self.last_version_of(&stream_id.subject(&self.inner.config.subject_prefix))
            .await
    }

    async fn last_version_of(&self, subject: &str) -> Result<u64, Error> {
        self.inner.last_version_of(subject).await
    }

    /// The aggregate's events from `from_position` (inclusive; 0 or 1 = all),
    /// up to its version at the time of the call. Empty at once when the
    /// aggregate has no events.
    pub async fn read(
        &self,
        stream_id: &StreamId,
        from_position: u64,
    ) -> Result<BoxStream<'static, Result<RecordedEvent, Error>>, Error> {
        let subject = stream_id.subject(&self.inner.config.subject_prefix);
        let last = self.last_version_of(&subject).await?;
        self.read_range(subject, from_position.max(1), last).await
    }

    /// Every event from `from_position` (inclusive) up to the head of the log
    /// at the time of the call.
    pub async fn read_all(
        &self,
        from_position: u64,
    ) -> Result<BoxStream<'static, Result<RecordedEvent, Error>>, Error> {
        let last = self.stream_state().await?.last_position;
        let filter = format!("{}.>", self.inner.config.subject_prefix);
        self.read_range(filter, from_position.max(1), last).await
    }

    /// A live feed of events on `filter` (e.g. `events.account.>`) from
    /// `from_position` (inclusive; `None` = only new events). Never ends.
    pub async fn subscribe(
        &self,
        filter: &str,
        from_position: Option<u64>,
    ) -> Result<BoxStream<'static, Result<RecordedEvent, Error>>, Error> {
        let deliver_policy = match from_position {
            Some(p) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: p.max(1),
            },
            None => consumer::DeliverPolicy::New,
        };
        let messages = self.ordered(filter.to_owned(), deliver_policy).await?;
        let this = self.clone();
        Ok(messages.map(move |m| this.decode_message(m)).boxed())
    }

    async fn ordered(
        &self,
        filter: String,
        deliver_policy: consumer::DeliverPolicy,
    ) -> Result<consumer::pull::Ordered, Error> {
        self.inner.ordered(filter, deliver_policy).await
    }

    async fn read_range(
        &self,
        filter: String,
        from: u64,
        last: u64,
    ) -> Result<BoxStream<'static, Result<RecordedEvent, Error>>, Error> {
        if last == 0 || from > last {
            return Ok(futures::stream::empty().boxed());
        }
        let messages = self
            .ordered(
                filter,
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
            )
            .await?;
        let this = self.clone();
        // Stop right after the last event: waiting for one past it would hang.
        let stream = futures::stream::unfold(Some(messages), move |state| {
            let this = this.clone();
            async move {
                let mut messages = state?;
                let item = messages.next().await?;
                let decoded = this.decode_message(item);
                let done = match &decoded {
                    Ok(ev) => ev.position >= last,
                    Err(_) => true,
                };
                Some((decoded, if done { None } else { Some(messages) }))
            }
        });
        Ok(stream.boxed())
    }

    fn decode_message(
        &self,
        m: Result<jetstream::Message, async_nats::error::Error<consumer::pull::OrderedErrorKind>>,
    ) -> Result<RecordedEvent, Error> {
        let m = m.map_err(|e| Error::Nats(e.to_string()))?;
        let position = m
            .info()
            .map_err(|e| Error::Nats(e.to_string()))?
            .stream_sequence;
        let stream_id = StreamId::from_subject(&self.inner.config.subject_prefix, &m.subject)?;
        let envelope =
            Envelope::decode(m.headers.as_ref(), &m.payload, usize::MAX).map_err(|e| {
                Error::InvalidStoredEvent {
                    position,
                    stream: stream_id.to_string(),
                    event_type: m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(crate::envelope::H_TYPE))
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

    /// Counts and positions of the whole log.
    pub async fn stream_state(&self) -> Result<StreamState, Error> {
        let mut stream = self.inner.stream.clone();
        let info = stream
            .info()
            .await
            .map_err(|e| Error::Nats(e.to_string()))?;
        Ok(StreamState {
            messages: info.state.messages,
            bytes: info.state.bytes,
            first_position: info.state.first_sequence,
            last_position: info.state.last_sequence,
            replicas: info.config.num_replicas,
            aggregates: info.state.subjects_count,
            max_age: info.config.max_age,
            max_bytes: info.config.max_bytes,
            max_messages: info.config.max_messages,
            max_messages_per_subject: info.config.max_messages_per_subject,
            duplicate_window: info.config.duplicate_window,
        })
    }
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

impl Inner {
    /// True once the stream refused an atomic batch.
    pub(crate) fn atomic_disabled(&self) -> bool {
        self.atomic_disabled.load(Ordering::Relaxed)
    }

    /// Remembers that the stream refuses atomic batches, so appends go one
    /// by one from now on; warns once.
    pub(crate) fn disable_atomic(&self) {
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
    pub(crate) async fn append_direct(&self, append: &Append) -> Result<AppendResult, Error> {
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
    pub(crate) async fn publish_group(&self, appends: &[Pending]) -> Result<(u64, u64), Attempt> {
        let batch: Vec<BatchMessage<'_>> = appends
            .iter()
            .flat_map(|p| {
                let a = &p.append;
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
    pub(crate) async fn resolve_wrong_last(
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
                Err(e) => return Err(Error::Nats(e.to_string())),
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
    pub(crate) async fn find_landed(
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
            .map_err(|e| Error::Nats(e.to_string()))?;
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
        let head = self.stream_head().await?;
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
            .map_err(|e| Error::Nats(e.to_string()))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| Error::Nats(e.to_string()))?;
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
            let m = m.map_err(|e| Error::Nats(e.to_string()))?;
            let seq = m
                .info()
                .map_err(|e| Error::Nats(e.to_string()))?
                .stream_sequence;
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

    /// The head of the log (its last position).
    async fn stream_head(&self) -> Result<u64, Error> {
        let mut stream = self.stream.clone();
        let info = stream
            .info()
            .await
            .map_err(|e| Error::Nats(e.to_string()))?;
        Ok(info.state.last_sequence)
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

    pub(crate) async fn last_version_of(&self, subject: &str) -> Result<u64, Error> {
        match self.stream.direct_get_last_for_subject(subject).await {
            Ok(msg) => Ok(msg.sequence),
            Err(e) if matches!(e.kind(), stream::DirectGetErrorKind::NotFound) => Ok(0),
            Err(e) => Err(Error::Nats(e.to_string())),
        }
    }

    async fn ordered(
        &self,
        filter: String,
        deliver_policy: consumer::DeliverPolicy,
    ) -> Result<consumer::pull::Ordered, Error> {
        let consumer = self
            .stream
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
}

fn msg_id(headers: &HeaderMap) -> Option<&str> {
    headers.get(H_MSG_ID).map(|v| v.as_str())
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
        && headers.get(H_TYPE).map(|v| v.as_str()) == Some(event.event_type.as_str())
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

async fn ensure_stream(
    js: &jetstream::Context,
    cfg: &StoreConfig,
) -> Result<stream::Stream, Error> {
    let wanted = stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![format!("{}.>", cfg.subject_prefix)],
        storage: stream::StorageType::File,
        num_replicas: cfg.replicas,
        duplicate_window: cfg.duplicate_window,
        max_age: Duration::ZERO,
        max_bytes: -1,
        max_messages: -1,
        max_messages_per_subject: -1,
        discard: stream::DiscardPolicy::Old,
        allow_direct: true,
        allow_atomic_publish: true,
        deny_delete: true,
        deny_purge: true,
        description: Some("Sluice domain events: one subject per aggregate".to_owned()),
        ..Default::default()
    };
    match js.get_stream(&cfg.stream).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| Error::Nats(e.to_string()))?;
            let c = &info.config;
            if !c.allow_atomic_publish
                || !c.allow_direct
                || c.duplicate_window != cfg.duplicate_window
            {
                tracing::info!(stream = %cfg.stream, "updating stream settings Sluice relies on");
                let mut updated = c.clone();
                updated.allow_atomic_publish = true;
                updated.allow_direct = true;
                updated.duplicate_window = cfg.duplicate_window;
                js.update_stream(updated)
                    .await
                    .map_err(|e| Error::StreamMisconfigured {
                        stream: cfg.stream.clone(),
                        reason: e.to_string(),
                    })?;
            }
            if c.max_age != Duration::ZERO || c.max_messages_per_subject > 0 {
                return Err(Error::StreamMisconfigured {
                    stream: cfg.stream.clone(),
                    reason:
                        "it has age or per-subject limits, which would delete events; remove them"
                            .to_owned(),
                });
            }
            Ok(existing)
        }
        Err(e) if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j) if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) => {
            js.create_stream(wanted)
                .await
                .map_err(|e| Error::StreamMisconfigured {
                    stream: cfg.stream.clone(),
                    reason: e.to_string(),
                })
        }
        Err(e) => Err(Error::Nats(e.to_string())),
    }
}

#[cfg(test)]
mod durability_tests {
    use super::*;

    fn safe() -> StreamState {
        StreamState {
            messages: 0,
            bytes: 0,
            first_position: 0,
            last_position: 0,
            replicas: 3,
            aggregates: 0,
            max_age: Duration::ZERO,
            max_bytes: -1,
            max_messages: -1,
            max_messages_per_subject: -1,
            duplicate_window: Duration::from_secs(120),
        }
    }

    #[test]
    fn each_risk_to_acknowledged_events_is_named() {
        let horizon = StoreConfig::default().retry_horizon();
        assert!(horizon < Duration::from_secs(120));
        assert!(safe().durability_warnings(None, true, horizon).is_empty());
        assert!(
            safe()
                .durability_warnings(Some(true), true, horizon)
                .is_empty()
        );
        let one = StreamState {
            replicas: 1,
            ..safe()
        };
        assert!(
            one.durability_warnings(Some(true), false, horizon)
                .is_empty()
        );
        let w = one.durability_warnings(Some(true), true, horizon);
        assert!(w[0].contains("production needs 3"), "{w:?}");
        assert!(one.durability_warnings(None, false, horizon)[0].contains("sync_interval"));
        assert!(
            safe().durability_warnings(Some(false), false, horizon)[0].contains("machine crashes")
        );
        let limited = StreamState {
            max_age: Duration::from_secs(3600),
            max_bytes: 1 << 30,
            max_messages_per_subject: 10,
            duplicate_window: Duration::from_secs(5),
            ..safe()
        };
        let w = limited.durability_warnings(Some(true), false, horizon);
        assert_eq!(w.len(), 4, "{w:?}");
    }
}
