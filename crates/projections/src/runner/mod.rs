//! The projection runner: fetch a batch from the log, apply it and move the
//! checkpoint in one transaction, retry database trouble forever with
//! backoff, dead-letter (or halt on) events the projection rejects.
//!
//! - this module: the settings, the live status, the runner and its loop;
//! - [`feed`]: reading the log from JetStream, decoding once per batch
//!   (voided and foreign events become skips, broken ones bad items);
//! - [`apply`]: a batch (or a parked aggregate's dead letters) applied to
//!   the read store in one transaction with the checkpoint.

mod apply;
mod feed;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::Serialize;
use sluice_events::{EventStore, StreamId, Voided};
use tokio_util::sync::CancellationToken;

use crate::bookkeeping;
use crate::db::Database;
use crate::dlq::consumer_name;
use crate::error::Error;
use crate::projection::{
    ProjectedEvent, Projection, REBUILD_SUFFIX, Rejection, RewindSupport, Tables,
};

use apply::Progress;
use feed::Fetched;
pub(crate) use feed::{Item, Raw};

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
        sluice_workers::dlq::ensure_streams(&store, 1).await?;
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
            out.push(crate::bookkeeping::read_checkpoint(&self.db, &s.key).await?);
        }
        Ok(out)
    }

    /// Creates the checkpoint rows if missing, clears old halts (a restart
    /// is the operator's "try again"), and returns the checkpoints.
    async fn init(&self) -> Result<Vec<u64>, Error> {
        for s in &self.slots {
            bookkeeping::ensure_checkpoint(self.db.pool(), &s.key).await?;
            bookkeeping::clear_halt(self.db.pool(), &s.key).await?;
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
}

/// A projection running on a tokio task (alone or in a group).
#[derive(Debug, Clone)]
pub struct RunningProjection {
    /// Its name.
    pub name: &'static str,
    /// Its live status (for the HTTP API).
    pub live: LiveStatus,
}

/// A runner on its own task: one projection or a group.
#[derive(Debug)]
pub struct RunningGroup {
    /// The projections it runs.
    pub projections: Vec<RunningProjection>,
    /// The task; ends on shutdown (`Ok`) or a halt (`Err(Error::Halted)`).
    pub task: tokio::task::JoinHandle<Result<(), Error>>,
}

/// Starts a runner for one `projection` on its own task.
pub async fn spawn<P: Projection>(
    projection: Arc<P>,
    db: Database,
    store: EventStore,
    config: RunnerConfig,
    shutdown: CancellationToken,
) -> Result<RunningGroup, Error> {
    spawn_group(vec![Member::from(projection)], db, store, config, shutdown).await
}

/// Starts one runner feeding several projections (one feed, one decode,
/// one transaction per batch; each keeps its own checkpoint and status).
pub async fn spawn_group(
    members: Vec<Member>,
    db: Database,
    store: EventStore,
    config: RunnerConfig,
    shutdown: CancellationToken,
) -> Result<RunningGroup, Error> {
    let runner = Runner::group(members, db, store, config).await?;
    let projections = runner
        .lives()
        .into_iter()
        .map(|(name, live)| RunningProjection { name, live })
        .collect();
    let task = tokio::spawn(async move {
        let result = runner.run(shutdown).await;
        if let Err(e) = &result {
            tracing::error!(error = %e, "projection runner stopped");
        }
        result
    });
    Ok(RunningGroup { projections, task })
}
