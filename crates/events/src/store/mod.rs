//! The event store on JetStream: one stream (`EVENTS`), one subject per
//! aggregate, optimistic concurrency on the per-subject last sequence.
//!
//! Layout: [`EventStore`] (here) is a thin front. `publish` is the write
//! path (one append or one group of appends to the server, with exact
//! outcomes), `group_commit` gathers concurrent appends into shared batches
//! on top of it, `read` and `voided` are the read side, `stream` the stream
//! itself, `access` what other crates need of the connection (other streams,
//! buckets, non-event publishes, connection state), and `config`, `types`
//! and `stats` the vocabulary they share.

use std::sync::Arc;

use async_nats::jetstream::{self, consumer};
use futures::stream::BoxStream;

use crate::connect::ConnectConfig;
use crate::envelope::NewEvent;
use crate::error::Error;
use crate::ids::StreamId;
use crate::server::{ServerVersion, check_server_version};

mod access;
mod config;
mod group_commit;
mod publish;
mod read;
mod stats;
mod stream;
mod types;
mod voided;

pub use config::{EVENTS_STREAM, GroupCommitConfig, StoreConfig};
pub use stats::{BATCH_SIZE_BUCKETS, BatchSizeBucket, GroupCommitStats};
pub use stream::StreamState;
pub use types::{AppendResult, ExpectedVersion, History, RecordedEvent};
pub use voided::{VOID_CATEGORY, Voided};

use group_commit::Appender;
use publish::Publisher;

/// The JetStream-backed event store. Cheap to clone.
#[derive(Clone)]
pub struct EventStore {
    inner: Arc<Inner>,
    /// The group-commit queue; `None` when group commit is off. Held only by
    /// the store's clones, so the dispatcher stops once they are all gone.
    appender: Option<Arc<Appender>>,
}

/// What the store's clones share.
struct Inner {
    /// The write path (also the connection, the stream and the settings),
    /// shared with the group-commit dispatcher.
    publisher: Arc<Publisher>,
    server_version: ServerVersion,
    /// The voided positions, loaded on first use.
    voided: tokio::sync::OnceCell<Voided>,
}

impl std::fmt::Debug for EventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStore")
            .field("stream", &self.inner.publisher.config.stream)
            .field("server_version", &self.inner.server_version)
            .finish()
    }
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
        let stream = stream::ensure(&js, &config).await?;
        let max_payload = client.server_info().max_payload;
        let publisher = Arc::new(Publisher::new(client, js, stream, config));
        let appender = publisher.config.group_commit.enabled.then(|| {
            Arc::new(Appender::start(
                publisher.clone(),
                &publisher.config.group_commit,
                max_payload,
            ))
        });
        let inner = Arc::new(Inner {
            publisher,
            server_version,
            voided: tokio::sync::OnceCell::new(),
        });
        Ok(Self { inner, appender })
    }

    /// What group commit has done so far: batches, events, batch-size
    /// distribution, conflicts resolved, fsyncs saved.
    pub fn group_commit_stats(&self) -> GroupCommitStats {
        let publisher = &self.inner.publisher;
        publisher
            .counters
            .snapshot(&publisher.config.group_commit, publisher.atomic_disabled())
    }

    /// The raw NATS connection: the escape hatch for tests and benches
    /// that act as a foreign client on purpose. Code of other crates uses
    /// what the store offers instead ([`event_stream`](Self::event_stream),
    /// [`ensure_stream`](Self::ensure_stream), [`publish_to`](Self::publish_to),
    /// [`is_connected`](Self::is_connected), [`server_info`](Self::server_info), ...).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.publisher.client
    }

    /// The raw JetStream context (with the store's request timeout): the
    /// escape hatch for tests and benches, like [`client`](Self::client).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.publisher.js
    }

    /// The store's settings.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.publisher.config
    }

    /// The connected server's version.
    pub fn server_version(&self) -> ServerVersion {
        self.inner.server_version
    }

    fn prefix(&self) -> &str {
        &self.config().subject_prefix
    }

    fn stream(&self) -> &async_nats::jetstream::stream::Stream {
        &self.inner.publisher.stream
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
        let publisher = &self.inner.publisher;
        let result = async {
            let append = publisher.encode(stream_id, expected, events)?;
            match &self.appender {
                Some(appender) if !publisher.atomic_disabled() => {
                    appender.submit(publisher, append).await
                }
                _ => publisher.append_direct(&append).await,
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
        if result.is_ok()
            && let Some(voided) = self.voided_if_loaded()
        {
            voided.note_append(stream_id);
        }
        result
    }

    /// The voided positions: loaded on the first call (one ordered
    /// consumer on the void category), then followed live.
    pub async fn voided(&self) -> Result<Voided, Error> {
        self.inner
            .voided
            .get_or_try_init(|| Voided::load(self.stream(), self.config()))
            .await
            .cloned()
    }

    /// The voided positions, if [`voided`](Self::voided) loaded them already.
    pub fn voided_if_loaded(&self) -> Option<&Voided> {
        self.inner.voided.get()
    }

    /// The aggregate's events up to its current version, voided ones left
    /// out; an event that cannot be decoded (and is not voided) is an
    /// [`Error::InvalidStoredEvent`] naming its position.
    pub async fn history(&self, stream_id: &StreamId) -> Result<History, Error> {
        let voided = self.voided().await?;
        read::history(self.stream(), self.prefix(), &voided, stream_id).await
    }

    /// What [`history`](Self::history) answers, read with direct gets
    /// instead of a consumer (what [`crate::load`] uses).
    ///
    /// A consumer is kept by the server for its inactivity threshold (30 s)
    /// after the read; code that reads small aggregates very often (sagas
    /// read an instance's log on every reply, claim, timeout and transition)
    /// would leave thousands of them and hit the server's consumer limit. A
    /// batched direct get (`allow_direct` on the stream, nats-server 2.11+)
    /// costs one request per 256 events and leaves nothing behind; when a
    /// batch fails, each event is read with a direct get of its own. A
    /// replica serving a direct get may lag the leader: every write based on
    /// such a read is an optimistic append, so a stale read costs a conflict
    /// and a reload, never a wrong write.
    pub async fn history_direct(&self, stream_id: &StreamId) -> Result<History, Error> {
        let voided = self.voided().await?;
        read::history_direct(
            self.client(),
            self.stream(),
            self.config(),
            &voided,
            stream_id,
        )
        .await
    }

    /// The aggregate's current version (0 when it has no events).
    pub async fn last_version(&self, stream_id: &StreamId) -> Result<u64, Error> {
        read::last_version_of(self.stream(), &stream_id.subject(self.prefix())).await
    }

    /// The aggregate's events from `from_position` (inclusive; 0 or 1 = all),
    /// up to its version at the time of the call. Empty at once when the
    /// aggregate has no events.
    pub async fn read(
        &self,
        stream_id: &StreamId,
        from_position: u64,
    ) -> Result<BoxStream<'static, Result<RecordedEvent, Error>>, Error> {
        let subject = stream_id.subject(self.prefix());
        let last = read::last_version_of(self.stream(), &subject).await?;
        read::range(
            self.stream(),
            self.prefix(),
            subject,
            from_position.max(1),
            last,
        )
        .await
    }

    /// Every event from `from_position` (inclusive) up to the head of the log
    /// at the time of the call.
    pub async fn read_all(
        &self,
        from_position: u64,
    ) -> Result<BoxStream<'static, Result<RecordedEvent, Error>>, Error> {
        let last = stream::head(self.stream()).await?;
        let filter = format!("{}.>", self.prefix());
        read::range(
            self.stream(),
            self.prefix(),
            filter,
            from_position.max(1),
            last,
        )
        .await
    }

    /// The events of `category` (every category when `None`) from
    /// `from_position` (inclusive) up to the head of the log at the time of
    /// the call, in log order: the log's pages for clients that follow it
    /// without a NATS connection.
    pub async fn read_category(
        &self,
        category: Option<&str>,
        from_position: u64,
    ) -> Result<BoxStream<'static, Result<RecordedEvent, Error>>, Error> {
        let filter = match category {
            Some(c) => {
                crate::validate_token("category", c)?;
                format!("{}.{c}.>", self.prefix())
            }
            None => format!("{}.>", self.prefix()),
        };
        // The last event of the category, not of the log: the read stops
        // there instead of waiting for one that will not come.
        let last = read::last_version_of(self.stream(), &filter).await?;
        read::range(
            self.stream(),
            self.prefix(),
            filter,
            from_position.max(1),
            last,
        )
        .await
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
        read::subscribe(self.stream(), self.prefix(), filter, deliver_policy).await
    }

    /// Counts and positions of the whole log.
    pub async fn stream_state(&self) -> Result<StreamState, Error> {
        stream::state(self.stream()).await
    }
}
