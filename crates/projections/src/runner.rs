//! The projection runner: fetch a batch from the log, apply it and move the
//! checkpoint in one transaction, retry database trouble forever with
//! backoff, dead-letter (or halt on) events the projection rejects.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{self, pull};
use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use sluice_events::{Envelope, EventStore, StreamId, Voided};
use sqlx::Row;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::db::{Database, is_transient};
use crate::dlq::{DeadLetter, DeadLetterKind};
use crate::error::Error;
use crate::projection::{
    ProjectedEvent, Projection, REBUILD_SUFFIX, Rejection, RewindSupport, Tables,
};

/// What to do with an event the projection cannot apply (a permanent failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Dead-letter it, park its aggregate for this projection (later events
    /// of it are dead-lettered behind it), keep applying everything else.
    #[default]
    DeadLetter,
    /// Stop the projection before the event; the status says why. Nothing
    /// after it is applied until the projection is restarted.
    Halt,
}

/// Settings of one runner.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Largest batch (one transaction). Batches grow with the lag up to this.
    pub max_batch: usize,
    /// How long to wait for more events when the broker says more are
    /// pending, before applying a partial batch.
    pub linger: Duration,
    /// Permanent-failure policy.
    pub failure_policy: FailurePolicy,
    /// First retry delay after a database or broker error.
    pub backoff_min: Duration,
    /// Longest retry delay (retries never stop: a projection never skips).
    pub backoff_max: Duration,
    /// How often an idle runner checks that its stored checkpoint was not
    /// moved (by a reset or a rebuild switch).
    pub idle_check: Duration,
}

impl RunnerConfig {
    /// Checks the settings make sense.
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_batch == 0 {
            return Err(Error::InvalidConfig("max_batch must be at least 1"));
        }
        if self.backoff_min > self.backoff_max {
            return Err(Error::InvalidConfig(
                "backoff_min must not exceed backoff_max",
            ));
        }
        if self.idle_check.is_zero() {
            return Err(Error::InvalidConfig("idle_check must be positive"));
        }
        Ok(())
    }
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            max_batch: 1000,
            linger: Duration::from_millis(20),
            failure_policy: FailurePolicy::DeadLetter,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            idle_check: Duration::from_secs(1),
        }
    }
}

/// The runner's lifecycle state, as shown by the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Not started yet (or not running in this process).
    Starting,
    /// Applying events (or waiting for new ones).
    Running,
    /// Building a new version of its tables from position 1.
    Rebuilding,
    /// Stopped by the `halt` policy.
    Halted,
    /// Stopped on shutdown.
    Stopped,
}

/// What the runner knows that the database does not (yet): shared with the
/// HTTP status and read-your-writes.
#[derive(Debug, Clone)]
pub struct LiveStatus(Arc<Mutex<Live>>);

/// A snapshot of a [`LiveStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct Live {
    /// Lifecycle state.
    pub state: RunState,
    /// Last committed checkpoint.
    pub checkpoint: u64,
    /// The transient error the runner is currently retrying, if any.
    pub last_error: Option<String>,
    /// Seconds it has been blocked on that error.
    #[serde(skip)]
    pub blocked_since: Option<Instant>,
    /// Events applied by this process.
    pub applied: u64,
    /// Events dead-lettered (rejected or parked) by this process.
    pub dead_lettered: u64,
    /// Size of the last batch.
    pub last_batch: usize,
    /// Why it is halted: stopped by the `halt` policy, or held because a
    /// dead letter cannot be stored (then it resumes once the DLQ takes it).
    pub halted: Option<String>,
    /// The halt is a dead letter that cannot be stored (it clears itself).
    #[serde(skip)]
    pub dead_letter_blocked: bool,
}

impl Default for LiveStatus {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Live {
            state: RunState::Starting,
            checkpoint: 0,
            last_error: None,
            blocked_since: None,
            applied: 0,
            dead_lettered: 0,
            last_batch: 0,
            halted: None,
            dead_letter_blocked: false,
        })))
    }
}

impl LiveStatus {
    /// A copy of the current values.
    pub fn snapshot(&self) -> Live {
        match self.0.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut Live)) {
        match self.0.lock() {
            Ok(mut g) => f(&mut g),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }
}

/// One message as fetched, kept raw so a dead letter carries the original.
#[derive(Debug)]
pub(crate) struct Raw {
    pub(crate) position: u64,
    pub(crate) subject: String,
    pub(crate) headers: Option<HeaderMap>,
    pub(crate) payload: Bytes,
    pub(crate) appended_at: OffsetDateTime,
    /// Messages the broker still holds for us after this one (the lag).
    pub(crate) pending: u64,
}

/// A fetched message after classification (once per batch, shared by the
/// members of a group).
pub(crate) enum Item {
    /// Of no member's categories: only moves the checkpoints.
    Skip,
    /// Of some member's categories but breaks the contract.
    Bad {
        key: String,
        category: String,
        reason: String,
    },
    /// Decoded.
    Event(Box<ProjectedEvent>),
}

impl Item {
    pub(crate) fn category(&self) -> Option<&str> {
        match self {
            Item::Skip => None,
            Item::Bad { category, .. } => Some(category),
            Item::Event(e) => Some(e.stream_id.category()),
        }
    }
}

/// Object-safe view of a [`Projection`], so one runner can drive several.
pub(crate) trait DynProjection: Send + Sync + 'static {
    fn dyn_name(&self) -> &'static str;
    fn dyn_categories(&self) -> &'static [&'static str];
    fn dyn_tables(&self) -> &'static [&'static str];
    fn dyn_apply<'c>(
        &'c self,
        conn: &'c mut sqlx::AnyConnection,
        tables: &'c Tables,
        events: &'c [ProjectedEvent],
    ) -> futures::future::BoxFuture<'c, Result<Vec<Rejection>, sqlx::Error>>;
    fn dyn_rewind_support(&self) -> RewindSupport;
    fn dyn_rewind<'c>(
        &'c self,
        conn: &'c mut sqlx::AnyConnection,
        tables: &'c Tables,
        from: u64,
        aggregates: &'c [StreamId],
    ) -> futures::future::BoxFuture<'c, Result<(), sqlx::Error>>;
}

impl<P: Projection> DynProjection for P {
    fn dyn_name(&self) -> &'static str {
        self.name()
    }

    fn dyn_categories(&self) -> &'static [&'static str] {
        self.categories()
    }

    fn dyn_tables(&self) -> &'static [&'static str] {
        self.tables()
    }

    fn dyn_apply<'c>(
        &'c self,
        conn: &'c mut sqlx::AnyConnection,
        tables: &'c Tables,
        events: &'c [ProjectedEvent],
    ) -> futures::future::BoxFuture<'c, Result<Vec<Rejection>, sqlx::Error>> {
        Box::pin(self.apply(conn, tables, events))
    }

    fn dyn_rewind_support(&self) -> RewindSupport {
        self.rewind_support()
    }

    fn dyn_rewind<'c>(
        &'c self,
        conn: &'c mut sqlx::AnyConnection,
        tables: &'c Tables,
        from: u64,
        aggregates: &'c [StreamId],
    ) -> futures::future::BoxFuture<'c, Result<(), sqlx::Error>> {
        Box::pin(self.rewind(conn, tables, from, aggregates))
    }
}

/// One projection of a group, type-erased: `Member::from(Arc::new(p))`.
#[derive(Clone)]
pub struct Member(pub(crate) Arc<dyn DynProjection>);

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Member").field(&self.0.dyn_name()).finish()
    }
}

impl Member {
    /// The projection's name.
    pub fn name(&self) -> &'static str {
        self.0.dyn_name()
    }

    /// How it can undo events (see [`Projection::rewind_support`]).
    pub fn rewind_support(&self) -> RewindSupport {
        self.0.dyn_rewind_support()
    }
}

impl<P: Projection> From<Arc<P>> for Member {
    fn from(p: Arc<P>) -> Self {
        Self(p)
    }
}

/// A member's runtime state.
pub(crate) struct Slot {
    pub(crate) projection: Arc<dyn DynProjection>,
    pub(crate) name: &'static str,
    /// Checkpoint (and parked / dead-letter) key: the projection's name, or
    /// `<name>__rebuild` for a rebuild.
    pub(crate) key: String,
    pub(crate) consumer_name: String,
    pub(crate) live: LiveStatus,
}

/// Permanent failures found so far, per member: position -> (kind, reason).
type Rejected = Vec<BTreeMap<u64, (DeadLetterKind, String)>>;

/// Runs one projection, or a *group* of projections sharing one feed, one
/// decode and one transaction per batch (each with its own checkpoint row,
/// parked set and dead letters), until shutdown or a halt.
pub struct Runner {
    pub(crate) slots: Vec<Slot>,
    pub(crate) db: Database,
    pub(crate) store: EventStore,
    /// Voided events: skipped (they only move the checkpoint).
    pub(crate) voided: Voided,
    config: RunnerConfig,
    /// Where batches are written.
    pub(crate) tables: Tables,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field(
                "projections",
                &self.slots.iter().map(|s| s.name).collect::<Vec<_>>(),
            )
            .field("config", &self.config)
            .finish()
    }
}

/// The consumer name a projection uses in dead letters (`dlq.<consumer>.<category>`).
pub fn consumer_name(projection: &str) -> String {
    format!("projection-{projection}")
}

impl Runner {
    /// A runner for one projection; ensures the `DLQ` stream.
    pub async fn new<P: Projection>(
        projection: Arc<P>,
        db: Database,
        store: EventStore,
        config: RunnerConfig,
    ) -> Result<Self, Error> {
        Self::group(vec![Member::from(projection)], db, store, config).await
    }

    /// A runner for several projections fed together (one feed, one decode,
    /// one transaction per batch). A `halt` of one stops the whole group.
    pub async fn group(
        members: Vec<Member>,
        db: Database,
        store: EventStore,
        config: RunnerConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        if members.is_empty() {
            return Err(Error::InvalidConfig(
                "a runner needs at least one projection",
            ));
        }
        sluice_workers::dlq::ensure_streams(store.jetstream(), 1).await?;
        let voided = store.voided().await?;
        let slots = members
            .into_iter()
            .map(|Member(projection)| {
                let name = projection.dyn_name();
                Slot {
                    projection,
                    name,
                    key: name.to_owned(),
                    consumer_name: consumer_name(name),
                    live: LiveStatus::default(),
                }
            })
            .collect();
        Ok(Self {
            slots,
            db,
            store,
            voided,
            config,
            tables: Tables::LIVE,
        })
    }

    /// Makes this runner build the rebuild tables from their own checkpoints
    /// (`<name>__rebuild`) instead of the live ones. Dead letters are only
    /// recorded in SQL: the live projection already sent them to the DLQ.
    pub(crate) fn for_rebuild(mut self) -> Self {
        for s in &mut self.slots {
            s.key = format!("{}{REBUILD_SUFFIX}", s.name);
        }
        self.tables = Tables::REBUILD;
        self
    }

    /// The status of its (first) projection, shared with the HTTP API.
    pub fn live(&self) -> LiveStatus {
        self.slots
            .first()
            .map(|s| s.live.clone())
            .unwrap_or_default()
    }

    /// The status of each projection it runs.
    pub fn lives(&self) -> Vec<(&'static str, LiveStatus)> {
        self.slots
            .iter()
            .map(|s| (s.name, s.live.clone()))
            .collect()
    }

    fn names(&self) -> String {
        self.slots
            .iter()
            .map(|s| s.name)
            .collect::<Vec<_>>()
            .join(",")
    }

    fn update_all(&self, f: impl Fn(&mut Live)) {
        for s in &self.slots {
            s.live.update(&f);
        }
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_min_delay(self.config.backoff_min)
            .with_max_delay(self.config.backoff_max)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// Applies events until `shutdown` is cancelled. Returns
    /// [`Error::Halted`] when the `halt` policy stopped it.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let names = self.names();
        let Some(mut checkpoints) = self.retrying(&shutdown, "start", || self.init()).await else {
            self.update_all(|l| l.state = RunState::Stopped);
            return Ok(());
        };
        tracing::info!(projection = %names, ?checkpoints, "projection starting");
        let state = if self.tables == Tables::REBUILD {
            RunState::Rebuilding
        } else {
            RunState::Running
        };
        for (s, cp) in self.slots.iter().zip(&checkpoints) {
            s.live.update(|l| {
                l.state = state;
                l.checkpoint = *cp;
            });
        }
        let mut backoff = self.backoff();
        // Voids this runner has released parked aggregates for.
        let mut voids_seen = 0;
        'consumer: loop {
            // Resume from the checkpoints in SQL, never from broker state: an
            // ordered (ephemeral) consumer right after the lowest one.
            let low = checkpoints.iter().copied().min().unwrap_or(0);
            let mut messages = match self.open(low + 1).await {
                Ok(m) => m,
                Err(e) => {
                    if self.pause(&shutdown, &mut backoff, &e.to_string()).await {
                        break 'consumer;
                    }
                    continue 'consumer;
                }
            };
            // The batch fetched and decoded while the previous one was being
            // written: decoding (client CPU) and the transaction (database)
            // overlap instead of taking turns.
            let mut prefetched: Option<Result<Fetched, Error>> = None;
            loop {
                if self.voided.len() != voids_seen {
                    voids_seen = self.release_voided(voids_seen).await;
                }
                let fetched = match prefetched.take() {
                    Some(f) => f,
                    None => self.next_batch(&mut messages, &shutdown).await,
                };
                let batch = match fetched {
                    Ok(Fetched::Batch(b)) => b,
                    Ok(Fetched::Shutdown) => break 'consumer,
                    Ok(Fetched::Idle) => {
                        // Nothing new: make sure nobody moved a checkpoint
                        // (a reset, a rebuild switch) while we waited.
                        match self.read_checkpoints().await {
                            Ok(stored) if stored != checkpoints => {
                                tracing::info!(projection = %names, ?checkpoints, ?stored, "checkpoint moved while idle; following it");
                                self.set_checkpoints(&stored);
                                checkpoints = stored;
                                continue 'consumer;
                            }
                            Ok(_) => {
                                // Healthy and idle: an error from before is over.
                                self.update_all(|l| {
                                    l.last_error = None;
                                    l.blocked_since = None;
                                });
                                continue;
                            }
                            Err(e) => {
                                let e = e.to_string();
                                self.update_all(|l| l.last_error = Some(e.clone()));
                                continue;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(projection = %names, error = %e, "event feed broke; reopening from the checkpoint");
                        if self.pause(&shutdown, &mut backoff, &e.to_string()).await {
                            break 'consumer;
                        }
                        continue 'consumer;
                    }
                };
                backoff = self.backoff();
                let low = checkpoints.iter().copied().min().unwrap_or(0);
                let batch: Vec<(Raw, Item)> = batch
                    .into_iter()
                    .filter(|(r, _)| r.position > low)
                    .collect();
                if batch.is_empty() {
                    continue;
                }
                // A prefetched batch is only used after an `Advanced`: on
                // `Reopen` the feed restarts from the stored checkpoints and
                // the prefetched events are dropped with it.
                let (progress, next) = tokio::join!(
                    self.process(batch, &checkpoints, &shutdown),
                    self.next_batch(&mut messages, &shutdown)
                );
                prefetched = Some(next);
                match progress? {
                    Progress::Advanced(new) => checkpoints = new,
                    Progress::Reopen(new) => {
                        self.set_checkpoints(&new);
                        checkpoints = new;
                        continue 'consumer;
                    }
                    Progress::Stopped => break 'consumer,
                }
            }
        }
        self.update_all(|l| l.state = RunState::Stopped);
        tracing::info!(projection = %names, ?checkpoints, "projection stopped");
        Ok(())
    }

    fn set_checkpoints(&self, checkpoints: &[u64]) {
        for (s, cp) in self.slots.iter().zip(checkpoints) {
            s.live.update(|l| l.checkpoint = *cp);
        }
    }

    async fn read_checkpoints(&self) -> Result<Vec<u64>, Error> {
        let mut out = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            out.push(read_checkpoint(&self.db, &s.key).await?);
        }
        Ok(out)
    }

    /// Creates the checkpoint rows if missing, clears old halts (a restart
    /// is the operator's "try again"), and returns the checkpoints.
    async fn init(&self) -> Result<Vec<u64>, Error> {
        for s in &self.slots {
            sqlx::query(
                "INSERT INTO sluice_checkpoints (projection, position) VALUES ($1, 0) \
                 ON CONFLICT (projection) DO NOTHING",
            )
            .bind(s.key.as_str())
            .execute(self.db.pool())
            .await?;
            sqlx::query(
                "UPDATE sluice_checkpoints SET halted_at_position = NULL, halted_reason = NULL \
                 WHERE projection = $1",
            )
            .bind(s.key.as_str())
            .execute(self.db.pool())
            .await?;
        }
        self.read_checkpoints().await
    }

    /// Runs `f` until it succeeds, backing off between tries; `None` on shutdown.
    async fn retrying<T, F, Fut>(&self, shutdown: &CancellationToken, what: &str, f: F) -> Option<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let mut backoff = self.backoff();
        loop {
            match f().await {
                Ok(v) => return Some(v),
                Err(e) => {
                    tracing::warn!(projection = %self.names(), what, error = %e, "retrying");
                    if self.pause(shutdown, &mut backoff, &e.to_string()).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Records a transient error and sleeps the next backoff delay; true when
    /// shutdown came first.
    async fn pause(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut impl Iterator<Item = Duration>,
        error: &str,
    ) -> bool {
        self.update_all(|l| {
            l.last_error = Some(error.to_owned());
            l.blocked_since.get_or_insert_with(Instant::now);
        });
        let delay = backoff.next().unwrap_or(self.config.backoff_max);
        tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tokio::time::sleep(delay) => false,
        }
    }

    async fn open(&self, from: u64) -> Result<pull::Ordered, Error> {
        let cfg = self.store.config();
        let stream = self
            .store
            .jetstream()
            .get_stream(&cfg.stream)
            .await
            .map_err(|e| Error::nats("opening the event stream", e))?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                // Every event, not only our categories: the checkpoint then
                // is a global position, which `min_position` compares with.
                filter_subject: format!("{}.>", cfg.subject_prefix),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| Error::nats("creating an ordered consumer", e))?;
        consumer
            .messages()
            .await
            .map_err(|e| Error::nats("reading the event stream", e))
    }

    /// Waits for the next event, then takes as many more as the lag
    /// suggests (up to `max_batch`).
    async fn next_batch(
        &self,
        messages: &mut pull::Ordered,
        shutdown: &CancellationToken,
    ) -> Result<Fetched, Error> {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(Fetched::Shutdown),
            m = messages.next() => m,
            _ = tokio::time::sleep(self.config.idle_check) => return Ok(Fetched::Idle),
        };
        let first = raw(first)?;
        let pending = first.pending;
        // Batch size follows the lag: one event when caught up (latency),
        // up to max_batch when behind (throughput).
        let want = usize::try_from(pending.saturating_add(1))
            .unwrap_or(usize::MAX)
            .clamp(1, self.config.max_batch.max(1));
        let mut batch = Vec::with_capacity(want);
        batch.push(first);
        let deadline = tokio::time::Instant::now() + self.config.linger;
        while batch.len() < want {
            let next = if pending > 0 {
                tokio::time::timeout_at(deadline, messages.next())
                    .await
                    .ok()
                    .flatten()
            } else {
                messages.next().now_or_never().flatten()
            };
            match next {
                Some(m) => match raw(Some(m)) {
                    Ok(r) => batch.push(r),
                    // Apply what we have; the next read reports the error.
                    Err(_) => break,
                },
                None => break,
            }
        }
        let batch = batch
            .into_iter()
            .map(|r| {
                let item = self.classify(&r);
                (r, item)
            })
            .collect();
        Ok(Fetched::Batch(batch))
    }

    /// Decodes a message once if any member reads its category.
    pub(crate) fn classify(&self, r: &Raw) -> Item {
        if self.voided.contains(r.position) {
            return Item::Skip;
        }
        let prefix = &self.store.config().subject_prefix;
        let category = r
            .subject
            .strip_prefix(prefix.as_str())
            .and_then(|s| s.strip_prefix('.'))
            .unwrap_or("")
            .split('.')
            .next()
            .unwrap_or("");
        if !self
            .slots
            .iter()
            .any(|s| s.projection.dyn_categories().contains(&category))
        {
            return Item::Skip;
        }
        let stream_id = match StreamId::from_subject(prefix, &r.subject) {
            Ok(s) => s,
            Err(e) => {
                return Item::Bad {
                    key: r.subject.clone(),
                    category: category.to_owned(),
                    reason: e.to_string(),
                };
            }
        };
        // The contract's size limit holds for every reader, not only the
        // append: an oversized event a raw client published is refused here.
        let limit = self.store.config().max_payload;
        match Envelope::decode(r.headers.as_ref(), &r.payload, limit) {
            Ok(envelope) => Item::Event(Box::new(ProjectedEvent {
                stream_id,
                position: r.position,
                envelope,
                appended_at: r.appended_at,
            })),
            Err(e) => Item::Bad {
                key: stream_id.to_string(),
                category: category.to_owned(),
                reason: sluice_workers::dlq::decode_reason(&e),
            },
        }
    }

    /// Applies one batch exactly once for every member.
    async fn process(
        &self,
        batch: Vec<(Raw, Item)>,
        checkpoints: &[u64],
        shutdown: &CancellationToken,
    ) -> Result<Progress, Error> {
        let (batch, items): (Vec<Raw>, Vec<Item>) = batch.into_iter().unzip();
        let _spans = self.apply_spans(&items);
        let mut rejected: Rejected = vec![BTreeMap::new(); self.slots.len()];
        for (r, item) in batch.iter().zip(&items) {
            if let Item::Bad {
                reason, category, ..
            } = item
            {
                for (i, s) in self.slots.iter().enumerate() {
                    if s.projection.dyn_categories().contains(&category.as_str())
                        && r.position > checkpoints[i]
                    {
                        rejected[i].insert(r.position, (DeadLetterKind::Decode, reason.clone()));
                    }
                }
            }
        }
        let mut backoff = self.backoff();
        // How much of the batch this attempt covers: under `halt`, only the
        // events before the first rejected one are applied.
        let mut len = batch.len();
        let mut halt_at: Option<(usize, u64, String)> = None;
        loop {
            if self.config.failure_policy == FailurePolicy::Halt {
                let first = rejected
                    .iter()
                    .enumerate()
                    .filter_map(|(i, m)| m.iter().next().map(|(p, (_, r))| (*p, i, r.clone())))
                    .min_by_key(|(p, _, _)| *p);
                if let Some((position, member, reason)) = first {
                    halt_at = Some((member, position, reason));
                    len = batch.iter().take_while(|r| r.position < position).count();
                    for m in &mut rejected {
                        m.clear();
                    }
                }
                if len == 0
                    && let Some((member, position, reason)) = &halt_at
                {
                    return Err(self.halt(*member, *position, reason, shutdown).await);
                }
            }
            let (batch, items) = (&batch[..len], &items[..len]);
            match self.attempt(batch, items, checkpoints, &rejected).await {
                Ok(Attempt::Committed { applied, dead }) => {
                    let last = batch.last().map_or(0, |r| r.position);
                    let lag = batch.last().map_or(0, |r| r.pending);
                    let mut new = checkpoints.to_vec();
                    for (i, s) in self.slots.iter().enumerate() {
                        new[i] = new[i].max(last);
                        s.live.update(|l| {
                            if l.dead_letter_blocked {
                                // The DLQ took the letter: running again.
                                l.dead_letter_blocked = false;
                                l.halted = None;
                                l.state = if self.tables == Tables::REBUILD {
                                    RunState::Rebuilding
                                } else {
                                    RunState::Running
                                };
                            }
                            l.checkpoint = new[i];
                            l.applied += applied[i] as u64;
                            l.dead_lettered += dead[i] as u64;
                            l.last_batch = batch.len();
                            l.last_error = None;
                            l.blocked_since = None;
                        });
                    }
                    tracing::debug!(
                        projection = %self.names(),
                        checkpoint = last,
                        ?applied,
                        ?dead,
                        lag,
                        "batch applied"
                    );
                    if let Some((member, position, reason)) = &halt_at {
                        return Err(self.halt(*member, *position, reason, shutdown).await);
                    }
                    return Ok(Progress::Advanced(new));
                }
                Ok(Attempt::Rejected(member, more)) => {
                    for rej in more {
                        tracing::warn!(projection = self.slots[member].name, position = rej.position, reason = %rej.reason, "event rejected");
                        rejected[member]
                            .insert(rej.position, (DeadLetterKind::Handler, rej.reason));
                    }
                }
                Ok(Attempt::Moved(actual)) => {
                    // Another writer (a second runner, a reset, a rebuild
                    // switching in its tables) moved a checkpoint: its writes
                    // count, ours would be duplicates or gaps. Follow it.
                    tracing::warn!(projection = %self.names(), ?checkpoints, ?actual, "checkpoint moved by another writer; following it");
                    return Ok(Progress::Reopen(actual));
                }
                Err(Error::DeadLetters(e)) if e.is_cannot_dead_letter() => {
                    // Never silently: nothing after the event is applied
                    // (the feed is shared, so the whole group waits), the
                    // state, readiness and the halted gauge say why, and
                    // the batch is retried until the DLQ takes the letter.
                    let why = e.to_string();
                    tracing::error!(projection = %self.names(), error = %why, "projection halted: a dead letter cannot be stored; fix the DLQ stream and it resumes by itself");
                    self.update_all(|l| {
                        l.state = RunState::Halted;
                        l.halted = Some(why.clone());
                        l.dead_letter_blocked = true;
                    });
                    if self.pause(shutdown, &mut backoff, &why).await {
                        return Ok(Progress::Stopped);
                    }
                }
                Err(e) => {
                    let transient = match &e {
                        Error::Database(db) => is_transient(db),
                        _ => true,
                    };
                    // Every failure here is the database's or the broker's,
                    // not the event's: block and retry, never skip. A commit
                    // whose answer was lost may have landed: the next
                    // attempt's compare-and-set then fails and the runner
                    // follows the stored checkpoint (no duplicate).
                    tracing::warn!(projection = %self.names(), error = %e, transient, "batch failed; retrying");
                    if self.pause(shutdown, &mut backoff, &e.to_string()).await {
                        return Ok(Progress::Stopped);
                    }
                }
            }
        }
    }

    /// A span per event that carries trace context, child of the span that
    /// appended it: the projection's step of that trace, open until the
    /// batch settles. Events without context get none (a trace of one span
    /// each would be noise, and they cost nothing this way), and neither
    /// does a rebuild (replaying history would add spans to old traces).
    fn apply_spans(&self, items: &[Item]) -> Vec<tracing::Span> {
        if self.tables != Tables::LIVE {
            return Vec::new();
        }
        items
            .iter()
            .filter_map(|item| match item {
                Item::Event(e) if e.envelope.traceparent.is_some() => Some(e),
                _ => None,
            })
            .map(|e| {
                let span = tracing::info_span!(
                    "projection.apply",
                    projection = %self.names(),
                    position = e.position,
                    stream = %e.stream_id,
                    event_type = %e.envelope.event_type,
                );
                sluice_events::trace::set_parent(&span, e.envelope.traceparent.as_deref());
                span
            })
            .collect()
    }

    /// One transaction: move every member's checkpoint (compare-and-set),
    /// apply what each may apply, record dead letters, commit.
    async fn attempt(
        &self,
        batch: &[Raw],
        items: &[Item],
        checkpoints: &[u64],
        rejected: &Rejected,
    ) -> Result<Attempt, Error> {
        let Some(last) = batch.last() else {
            return Ok(Attempt::Moved(checkpoints.to_vec()));
        };
        let now_ms = unix_ms(OffsetDateTime::now_utc());
        let mut tx = self.db.pool().begin().await?;
        // The checkpoint writes come first: they take the row locks
        // (PostgreSQL) or the write lock (SQLite) at once, so two runners of
        // one projection serialize here. In name order, as every other
        // writer of several rows (a group rebuild's switch) takes them, so
        // overlapping groups never deadlock.
        let mut order: Vec<usize> = (0..self.slots.len()).collect();
        order.sort_by(|&a, &b| self.slots[a].key.cmp(&self.slots[b].key));
        for (s, &expected) in order.iter().map(|&i| (&self.slots[i], &checkpoints[i])) {
            if last.position <= expected {
                continue;
            }
            let moved = sqlx::query(
                "UPDATE sluice_checkpoints SET position = $1, event_time_ms = $2, updated_at_ms = $3 \
                 WHERE projection = $4 AND position = $5",
            )
            .bind(to_i64(last.position))
            .bind(unix_ms(last.appended_at))
            .bind(now_ms)
            .bind(s.key.as_str())
            .bind(to_i64(expected))
            .execute(&mut *tx)
            .await?;
            if moved.rows_affected() != 1 {
                drop(tx);
                return Ok(Attempt::Moved(self.read_checkpoints().await?));
            }
        }
        let mut newly_parked: Vec<Vec<(String, u64)>> = vec![Vec::new(); self.slots.len()];
        let mut dead: Vec<Vec<(DeadLetter<'_>, String)>> =
            (0..self.slots.len()).map(|_| Vec::new()).collect();
        let mut applied = vec![0usize; self.slots.len()];
        let mut shared: Option<(Vec<&ProjectedEvent>, Vec<ProjectedEvent>)> = None;
        for (i, s) in self.slots.iter().enumerate() {
            let categories = s.projection.dyn_categories();
            let mut parked: HashMap<String, u64> = HashMap::new();
            let rows = sqlx::query(
                "SELECT stream, behind_position FROM sluice_parked WHERE projection = $1",
            )
            .bind(s.key.as_str())
            .fetch_all(&mut *tx)
            .await?;
            for row in rows {
                parked.insert(row.try_get(0)?, to_u64(row.try_get(1)?));
            }
            let mut selected: Vec<&ProjectedEvent> = Vec::new();
            for (r, item) in batch.iter().zip(items) {
                if r.position <= checkpoints[i] {
                    continue;
                }
                let Some(category) = item.category() else {
                    continue;
                };
                if !categories.contains(&category) {
                    continue;
                }
                // The common case, without building the aggregate's key:
                // nothing parked, nothing rejected here.
                if let Item::Event(e) = item
                    && parked.is_empty()
                    && !rejected[i].contains_key(&r.position)
                {
                    selected.push(e);
                    continue;
                }
                let (key, event) = match item {
                    Item::Skip => continue,
                    Item::Bad { key, .. } => (key.clone(), None),
                    Item::Event(e) => (e.stream_id.to_string(), Some(e)),
                };
                let letter = |kind, reason: String, behind| DeadLetter {
                    position: r.position,
                    subject: &r.subject,
                    headers: r.headers.as_ref(),
                    payload: &r.payload,
                    kind,
                    reason,
                    behind,
                };
                if let Some(&behind) = parked.get(&key) {
                    let reason = format!(
                        "parked behind the dead letter at position {behind} of the same aggregate"
                    );
                    dead[i].push((letter(DeadLetterKind::Parked, reason, Some(behind)), key));
                } else if let Some((kind, reason)) = rejected[i].get(&r.position) {
                    dead[i].push((letter(*kind, reason.clone(), None), key.clone()));
                    parked.insert(key.clone(), r.position);
                    newly_parked[i].push((key, r.position));
                } else if let Some(e) = event {
                    selected.push(e);
                }
            }
            // Members of a group usually take the same events: copy them
            // once for all of those, not once per member.
            let reuse = matches!(&shared, Some((prev, _))
                if prev.len() == selected.len()
                    && prev.iter().zip(&selected).all(|(a, b)| std::ptr::eq(*a, *b)));
            if !reuse {
                let owned: Vec<ProjectedEvent> = selected.iter().copied().cloned().collect();
                shared = Some((selected, owned));
            }
            let apply: &[ProjectedEvent] = shared.as_ref().map_or(&[], |(_, owned)| owned);
            let rejections = s.projection.dyn_apply(&mut tx, &self.tables, apply).await?;
            if !rejections.is_empty() {
                tx.rollback().await?;
                return Ok(Attempt::Rejected(i, rejections));
            }
            applied[i] = apply.len();
        }
        for (i, s) in self.slots.iter().enumerate() {
            for (key, behind) in &newly_parked[i] {
                sqlx::query(
                    "INSERT INTO sluice_parked (projection, stream, behind_position, parked_at_ms) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (projection, stream) DO NOTHING",
                )
                .bind(s.key.as_str())
                .bind(key.as_str())
                .bind(to_i64(*behind))
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            }
            for (d, key) in &dead[i] {
                sqlx::query(
                    "INSERT INTO sluice_dead_letters \
                     (projection, position, stream, kind, reason, failed_at_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (projection, position) DO NOTHING",
                )
                .bind(s.key.as_str())
                .bind(to_i64(d.position))
                .bind(key.as_str())
                .bind(d.kind.as_str())
                .bind(d.reason.as_str())
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            }
        }
        // Dead letters go out before the commit: if the commit fails the
        // batch is retried and the DLQ dedups the copies by
        // `<stream>:<consumer>:<seq>`; the other order could lose them.
        if self.tables == Tables::LIVE {
            for (i, s) in self.slots.iter().enumerate() {
                for (d, _) in &dead[i] {
                    let events = self.store.config().stream.as_str();
                    sluice_workers::dlq::write(
                        self.store.jetstream(),
                        d.to_new(&s.consumer_name, events),
                    )
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(Attempt::Committed {
            applied,
            dead: dead.iter().map(Vec::len).collect(),
        })
    }

    /// Records the halt (best effort: the database may be what is failing)
    /// and returns the error the runner stops with.
    async fn halt(
        &self,
        member: usize,
        position: u64,
        reason: &str,
        shutdown: &CancellationToken,
    ) -> Error {
        let slot = &self.slots[member];
        tracing::error!(
            projection = slot.name,
            position,
            reason,
            "projection halted by policy"
        );
        for (i, s) in self.slots.iter().enumerate() {
            s.live.update(|l| {
                if i == member {
                    l.state = RunState::Halted;
                    l.halted = Some(format!("position {position}: {reason}"));
                } else {
                    // Its group-mate stopped the shared feed.
                    l.state = RunState::Stopped;
                    l.last_error = Some(format!("stopped with its group: {} halted", slot.name));
                }
            });
        }
        let _ = self
            .retrying(shutdown, "recording the halt", || async {
                sqlx::query(
                    "UPDATE sluice_checkpoints SET halted_at_position = $1, halted_reason = $2 \
                     WHERE projection = $3",
                )
                .bind(to_i64(position))
                .bind(reason)
                .bind(slot.key.as_str())
                .execute(self.db.pool())
                .await
                .map_err(Error::from)
            })
            .await;
        Error::Halted {
            projection: slot.name.to_owned(),
            position,
            reason: reason.to_owned(),
        }
    }
}

/// What waiting for events gave.
enum Fetched {
    /// Messages with what they decoded to.
    Batch(Vec<(Raw, Item)>),
    /// Nothing for `idle_check`.
    Idle,
    Shutdown,
}

/// What processing a batch led to.
enum Progress {
    /// Applied up to these checkpoints (one per member).
    Advanced(Vec<u64>),
    /// The stored checkpoints moved under us: reopen the feed after them.
    Reopen(Vec<u64>),
    /// Shutdown while blocked.
    Stopped,
}

enum Attempt {
    Committed {
        applied: Vec<usize>,
        dead: Vec<usize>,
    },
    Rejected(usize, Vec<Rejection>),
    Moved(Vec<u64>),
}

pub(crate) fn raw(
    m: Option<Result<async_nats::jetstream::Message, pull::OrderedError>>,
) -> Result<Raw, Error> {
    let m = m
        .ok_or_else(|| Error::nats("reading the event stream", "the feed ended"))?
        .map_err(|e| Error::nats("reading the event stream", e))?;
    let info = m
        .info()
        .map_err(|e| Error::nats("reading message info", e))?;
    let (position, pending, appended_at) = (info.stream_sequence, info.pending, info.published);
    // Taken apart rather than cloned: a header map is ~20 allocations.
    let async_nats::Message {
        subject,
        headers,
        payload,
        ..
    } = m.message;
    Ok(Raw {
        position,
        subject: subject.to_string(),
        headers,
        payload,
        appended_at,
        pending,
    })
}

/// The stored checkpoint of `projection` (0 when it never ran).
pub async fn read_checkpoint(db: &Database, projection: &str) -> Result<u64, Error> {
    let row = sqlx::query("SELECT position FROM sluice_checkpoints WHERE projection = $1")
        .bind(projection)
        .fetch_optional(db.pool())
        .await?;
    Ok(match row {
        Some(r) => to_u64(r.try_get(0)?),
        None => 0,
    })
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}
