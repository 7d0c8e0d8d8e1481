//! The orchestrator: sends the commands each stored transition produced, and
//! turns fired deadlines into `StepTimedOut` transitions.
//!
//! - It is a worker (`sluice-workers`) on `events.saga-<name>.>`: for each
//!   transition it folds the instance's log up to it and sends that
//!   transition's commands. The transition is durable before anything is
//!   sent (it *is* the event being handled), and a crash before the ack
//!   redelivers it, so its commands are sent again with the same ids: the
//!   event store dedups the resend (`Nats-Msg-Id` = command id), and past
//!   the duplicate window the handler finds the command answered in the log.
//! - Deadlines are messages scheduled on the `SAGA_TIMERS` stream (server
//!   message scheduling, `Nats-Schedule: @at <RFC 3339>`): the server
//!   publishes them at the due time whether or not any orchestrator runs,
//!   and a durable consumer hands them to the next orchestrator that starts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{AckKind, consumer, stream};
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice_events::{EventId, EventStore, ExpectedVersion, NewEvent};
use sluice_workers::{Delivery, HandlerError, WorkerConfig};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;

use crate::log::{
    COMMAND, COMMAND_CATEGORY_PREFIX, CommandMessage, CommandStatus, Guarded, SAGA_CATEGORY_PREFIX,
    append_guarded, command_target, decode_record, read_log,
};
use crate::model::{
    Command, CommandKind, Definition, SagaError, SagaEvent, SagaState, Status, react,
};

/// The stream holding scheduled deadlines and fired timeouts.
pub const TIMERS_STREAM: &str = "SAGA_TIMERS";
/// Subject prefix of `TIMERS_STREAM`.
pub const TIMERS_PREFIX: &str = "sluice.saga.timers";
/// Header naming when a scheduled message fires (nats-server 2.12+).
pub const H_SCHEDULE: &str = "Nats-Schedule";
/// Header naming the subject a scheduled message is published to.
pub const H_SCHEDULE_TARGET: &str = "Nats-Schedule-Target";

/// How an orchestrator runs.
#[derive(Debug, Clone)]
pub struct OrchestratorConfig {
    /// The worker on `events.saga-<name>.>` (its name is the durable
    /// consumer: a constant, never renamed). Its filter is set by `run`.
    pub worker: WorkerConfig,
    /// Durable consumer name on `SAGA_TIMERS` for this saga's timeouts.
    pub timers_consumer: String,
    /// Replicas of `SAGA_TIMERS` when this orchestrator creates it.
    pub replicas: usize,
    /// Delay before a failed timeout is handled again.
    pub timer_retry: Duration,
    /// Durable names of the command handlers (workers) that serve this
    /// saga's commands. Their dead letters on `dlq.<consumer>.cmd-*` are
    /// read by the orchestrator: a dead-lettered command the saga waits for
    /// moves it to `needs_attention`. Empty: dead letters are not watched.
    pub command_consumers: Vec<String>,
    /// Durable consumer name on `DLQ` for those dead letters.
    pub dead_letters_consumer: String,
}

impl OrchestratorConfig {
    /// Defaults for the durable worker name `worker` (the filter on the
    /// saga's streams is derived from the definition in `run_orchestrator`).
    pub fn new(worker: &'static str) -> Self {
        Self {
            worker: WorkerConfig::new(worker),
            timers_consumer: format!("{worker}-timers"),
            replicas: 1,
            timer_retry: Duration::from_secs(1),
            command_consumers: Vec::new(),
            dead_letters_consumer: format!("{worker}-dlq"),
        }
    }
}

#[derive(Serialize, serde::Deserialize)]
struct Timer {
    saga: String,
    saga_id: String,
    #[serde(default)]
    step: usize,
    #[serde(default)]
    attempt: u32,
    /// Set for the overall deadline: the position of the transition that
    /// armed it (`Started` or an operator's `Retried`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deadline: Option<u64>,
}

/// Creates `SAGA_TIMERS` (message schedules allowed) if missing.
pub async fn ensure_timers_stream(store: &EventStore, replicas: usize) -> Result<(), SagaError> {
    let config = stream::Config {
        name: TIMERS_STREAM.to_owned(),
        subjects: vec![format!("{TIMERS_PREFIX}.>")],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        allow_message_schedules: true,
        // Fired timeouts are handled within seconds; a week is plenty for an
        // orchestrator outage and keeps the stream from growing forever.
        max_age: Duration::from_secs(7 * 24 * 3600),
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    store
        .ensure_stream(config)
        .await
        .map_err(|e| SagaError::Nats {
            doing: "creating the SAGA_TIMERS stream",
            reason: e.to_string(),
        })
}

/// Sends one command: appends it to `events.cmd-<category>.<target-id>` with
/// the command id as event id, so a resend is deduplicated by the server.
pub async fn send_command(
    store: &EventStore,
    saga: &str,
    saga_id: &str,
    command: &Command,
) -> Result<(), SagaError> {
    send_command_at(store, saga, saga_id, command, None).await
}

/// [`send_command`] telling the handler the log version the command was
/// issued at (the transition's position), so it can append its claim and
/// reply without reading the saga's log first.
async fn send_command_at(
    store: &EventStore,
    saga: &str,
    saga_id: &str,
    command: &Command,
    log_version: Option<u64>,
) -> Result<(), SagaError> {
    let target = command_target(command)?;
    let subject = sluice_events::StreamId::new(
        format!("{COMMAND_CATEGORY_PREFIX}{}", target.category()),
        target.id(),
    )?;
    let msg = CommandMessage {
        saga: saga.to_owned(),
        saga_id: saga_id.to_owned(),
        command: command.clone(),
        log_version,
    };
    let event = NewEvent::json(COMMAND, &msg)?
        .with_id(EventId::parse(&command.id)?)
        .with_source("urn:sluice:saga")
        .with_correlation_id(saga_id);
    match store
        .append(&subject, ExpectedVersion::Any, vec![event])
        .await
    {
        Ok(_) => Ok(()),
        // Sent before, from another log version: the command is out.
        Err(sluice_events::Error::IdReused {
            existing_stream: Some(s),
            ..
        }) if s == subject.to_string() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Schedules the deadline of an action at `due`.
async fn schedule_timeout(
    store: &EventStore,
    saga: &str,
    saga_id: &str,
    command: &Command,
    due: OffsetDateTime,
) -> Result<(), SagaError> {
    let timer = Timer {
        saga: saga.to_owned(),
        saga_id: saga_id.to_owned(),
        step: command.step,
        attempt: command.attempt,
        deadline: None,
    };
    let suffix = format!("{saga}.{saga_id}.{}.{}", command.step, command.attempt);
    schedule(
        store,
        &suffix,
        &format!("timer:{}", command.id),
        &timer,
        due,
    )
    .await
}

/// Schedules the overall deadline armed by the transition at `armed`.
async fn schedule_saga_deadline(
    store: &EventStore,
    saga: &str,
    saga_id: &str,
    armed: u64,
    due: OffsetDateTime,
) -> Result<(), SagaError> {
    let timer = Timer {
        saga: saga.to_owned(),
        saga_id: saga_id.to_owned(),
        step: 0,
        attempt: 0,
        deadline: Some(armed),
    };
    let suffix = format!("{saga}.{saga_id}.deadline.{armed}");
    let id = format!("timer:{saga_id}/deadline/{armed}");
    schedule(store, &suffix, &id, &timer, due).await
}

/// Publishes `timer` on `SAGA_TIMERS` to fire at `due` on
/// `sluice.saga.timers.fired.<suffix>`.
async fn schedule(
    store: &EventStore,
    suffix: &str,
    msg_id: &str,
    timer: &Timer,
    due: OffsetDateTime,
) -> Result<(), SagaError> {
    let nats = |doing, e: &dyn std::fmt::Display| SagaError::Nats {
        doing,
        reason: e.to_string(),
    };
    let mut headers = HeaderMap::new();
    // Whole seconds, rounded up: a deadline may fire a little late, never early.
    let due = if due.nanosecond() > 0 {
        due.replace_nanosecond(0)
            .map_err(|e| nats("formatting a deadline", &e))?
            + Duration::from_secs(1)
    } else {
        due
    };
    let at = due
        .format(&Rfc3339)
        .map_err(|e| nats("formatting a deadline", &e))?;
    headers.insert(H_SCHEDULE, format!("@at {at}").as_str());
    headers.insert(
        H_SCHEDULE_TARGET,
        format!("{TIMERS_PREFIX}.fired.{suffix}").as_str(),
    );
    headers.insert("Nats-Msg-Id", msg_id);
    let body = serde_json::to_vec(timer).map_err(|e| nats("encoding a timer", &e))?;
    store
        .publish_to(format!("{TIMERS_PREFIX}.at.{suffix}"), headers, body.into())
        .await
        .map_err(|e| nats("scheduling a deadline", &e))?
        .await
        .map_err(|e| nats("scheduling a deadline", &e))?;
    Ok(())
}

/// Records that an action's deadline passed, unless a handler claimed or
/// answered it first (then the timeout is ignored: the handler decides).
pub async fn record_timeout(
    store: &EventStore,
    saga: &str,
    saga_id: &str,
    step: usize,
    attempt: u32,
) -> Result<Guarded, SagaError> {
    append_guarded(store, saga, saga_id, |log| {
        match log.command_status(CommandKind::Action, step, attempt) {
            CommandStatus::Open => Ok((
                SagaEvent::StepTimedOut { step, attempt },
                format!("{saga_id}/{step}/{attempt}/timeout"),
            )),
            CommandStatus::Claimed => {
                Err("the step was claimed by its handler before it timed out")
            }
            CommandStatus::Answered => Err("the step already completed"),
            CommandStatus::TimedOut => Err("already timed out"),
            CommandStatus::DeadLettered => Err("the step's command was dead-lettered"),
            CommandStatus::Closed => Err("an operator resolved or abandoned the saga"),
        }
    })
    .await
}

/// Records that the overall deadline armed at `armed` passed, unless the
/// saga ended meanwhile or a later operator retry re-armed it. What it does
/// depends on the command the saga waits for (see
/// [`SagaEvent::DeadlinePassed`]): an unclaimed action is closed and the
/// saga compensates; a claimed action or a compensation makes it need
/// attention.
pub async fn record_deadline<D: DeserializeOwned + Clone>(
    store: &EventStore,
    def: &Definition<D>,
    saga_id: &str,
    armed: u64,
) -> Result<Guarded, SagaError> {
    let deadline_ms = u64::try_from(def.overall_deadline().as_millis()).unwrap_or(u64::MAX);
    append_guarded(store, def.name(), saga_id, |log| {
        let latest = log
            .records
            .iter()
            .rev()
            .find(|r| matches!(r.event, SagaEvent::Started | SagaEvent::Retried { .. }))
            .map(|r| r.position);
        if latest != Some(armed) {
            return Err("an operator retry re-armed the deadline");
        }
        let (state, _) = log.fold(def).map_err(|_| "the saga's log does not fold")?;
        let (kind, step) = match state.status {
            Status::Running { step } => (CommandKind::Action, step),
            Status::Compensating { step, .. } => (CommandKind::Compensation, step),
            _ => return Err("the saga ended before its deadline"),
        };
        let claimed = match log.command_status(kind, step, state.attempt) {
            CommandStatus::Open => false,
            CommandStatus::Claimed => kind == CommandKind::Action,
            _ => return Err("the command in flight was answered meanwhile"),
        };
        Ok((
            SagaEvent::DeadlinePassed {
                armed,
                kind,
                step,
                attempt: state.attempt,
                claimed,
                deadline_ms,
            },
            format!("{saga_id}/deadline/{armed}"),
        ))
    })
    .await
}

/// A dead letter of a command, as the orchestrator reads it from `DLQ`.
#[derive(Debug, Clone)]
pub struct DeadCommand {
    /// The command as sent.
    pub message: CommandMessage,
    /// The consumer that gave up on it.
    pub consumer: String,
    /// The dead letter's id (sequence in `DLQ`).
    pub dead_letter: u64,
    /// Why it was dead-lettered.
    pub reason: String,
}

/// Records that the command in `dead` was dead-lettered, if it is the one
/// the saga waits for and not answered yet; anything else (a duplicate
/// redelivery dead-lettered after the reply, an older attempt, a saga that
/// ended) changes nothing.
pub async fn record_dead_letter<D: DeserializeOwned + Clone>(
    store: &EventStore,
    def: &Definition<D>,
    dead: &DeadCommand,
) -> Result<Guarded, SagaError> {
    let cmd = &dead.message.command;
    let (kind, step, attempt) = (cmd.kind, cmd.step, cmd.attempt);
    append_guarded(store, def.name(), &dead.message.saga_id, |log| {
        match log.command_status(kind, step, attempt) {
            CommandStatus::Open | CommandStatus::Claimed => {}
            _ => return Err("the command was answered, timed out or recorded already"),
        }
        let (state, _) = log.fold(def).map_err(|_| "the saga's log does not fold")?;
        let waits = state.attempt == attempt
            && match (&state.status, kind) {
                (Status::Running { step: s }, CommandKind::Action)
                | (Status::Compensating { step: s, .. }, CommandKind::Compensation) => *s == step,
                (Status::NeedsAttention { step: s, retry, .. }, k) => *s == step && *retry == k,
                _ => false,
            };
        if !waits {
            return Err("the saga does not wait for this command");
        }
        Ok((
            SagaEvent::CommandDeadLettered {
                kind,
                step,
                attempt,
                command: cmd.id.clone(),
                consumer: dead.consumer.clone(),
                dead_letter: dead.dead_letter,
                reason: dead.reason.clone(),
            },
            format!("{}/dead-lettered", cmd.id),
        ))
    })
    .await
}

/// Saga states the orchestrator folded, by instance: (state after the
/// transition at `version`, `version`). Each stored transition names the
/// version it extends (`after`), so when it extends the cached one the
/// orchestrator reacts to it alone instead of reading and folding the whole
/// log. Anything else (a cold cache after a restart, a redelivery, a
/// transition another replica handled) reads the log, as before.
struct StateCache<D> {
    states: std::sync::Mutex<HashMap<String, (SagaState<D>, u64)>>,
}

/// Instances kept before the cache is emptied (final sagas leave it at once;
/// this bounds the ones that stall).
const CACHED_SAGAS: usize = 50_000;

impl<D> StateCache<D> {
    fn new() -> Self {
        Self {
            states: std::sync::Mutex::new(HashMap::new()),
        }
    }

    // One instance's transitions are handled one at a time (worker lanes
    // keep a subject in order), so taking the entry out and putting it back
    // never races with another transition of the same instance.
    fn take(&self, id: &str) -> Option<(SagaState<D>, u64)> {
        self.states.lock().ok()?.remove(id)
    }

    fn put(&self, id: &str, state: SagaState<D>, version: u64) {
        if let Ok(mut states) = self.states.lock() {
            if states.len() >= CACHED_SAGAS {
                states.clear();
            }
            states.insert(id.to_owned(), (state, version));
        }
    }
}

/// Handles one stored transition: sends its commands and schedules their
/// deadlines. Its span is a child of the worker's, which continues the
/// transition's `ce-traceparent`; the commands it appends carry it on.
#[tracing::instrument(name = "saga.step", skip_all, fields(saga = def.name(), saga_id = %d.stream_id.id(), position = d.sequence))]
async fn on_transition<D>(
    store: &EventStore,
    def: &Definition<D>,
    cache: &StateCache<D>,
    d: &Delivery,
) -> Result<(), SagaError>
where
    D: DeserializeOwned + Clone,
{
    let saga_id = d.stream_id.id();
    let position = d.sequence;
    let (record, data) = decode_record(&d.envelope, position)?;
    let cached = cache.take(saga_id);
    let folded = match (cached, data, record.after) {
        // The next transition after the cached state.
        (Some((state, version)), None, Some(after)) if after == version => {
            Some(react(def, &state, &record.event))
        }
        // The first transition: its data is all the state there is.
        (_, Some(data), _) => {
            let data: D = serde_json::from_value(data).map_err(|e| SagaError::Decode {
                what: "saga data",
                reason: e.to_string(),
            })?;
            Some(react(def, &SagaState::new(saga_id, data), &record.event))
        }
        _ => None,
    };
    let (state, commands) = match folded {
        Some(f) => f,
        None => {
            tracing::debug!(
                saga = def.name(),
                saga_id,
                position,
                "saga state not cached; reading its log"
            );
            let log = read_log(store, def.name(), saga_id).await?;
            match log.fold_to(def, position)? {
                Some(f) => f,
                None => return Ok(()),
            }
        }
    };
    // Deadlines count from the transition, not from whenever an orchestrator
    // got to it, so a resend after a crash schedules the same due time.
    let from = d.envelope.time.unwrap_or_else(OffsetDateTime::now_utc);
    // A start (or an operator's retry) arms the overall deadline; the
    // transition is durable already, so a crash before this reschedules the
    // same instant (deduplicated). It goes out alongside the commands.
    let arms = matches!(record.event, SagaEvent::Started | SagaEvent::Retried { .. })
        && !state.status.is_final();
    let overall = async {
        if arms {
            let now = OffsetDateTime::now_utc();
            let due = (from + def.overall_deadline()).max(now + Duration::from_secs(1));
            schedule_saga_deadline(store, def.name(), saga_id, position, due).await?;
        }
        Ok::<_, SagaError>(())
    };
    let send_all = async {
        for command in &commands {
            let send = send_command_at(store, def.name(), saga_id, command, Some(position));
            let schedule = async {
                if let (CommandKind::Action, Some(deadline)) = (command.kind, command.deadline) {
                    let now = OffsetDateTime::now_utc();
                    // A deadline already past (the orchestrator was down) fires
                    // at once; the server wants a time in the future.
                    let due = (from + deadline).max(now + Duration::from_secs(1));
                    schedule_timeout(store, def.name(), saga_id, command, due).await?;
                }
                Ok::<_, SagaError>(())
            };
            // Independent writes: the command and its deadline go out together.
            futures::try_join!(send, schedule)?;
            tracing::debug!(saga = def.name(), saga_id, command = %command.id, kind = ?command.kind, "command sent");
        }
        Ok::<_, SagaError>(())
    };
    futures::try_join!(overall, send_all)?;
    if !state.status.is_final() {
        cache.put(saga_id, state, position);
    }
    Ok(())
}

fn classify(e: SagaError) -> HandlerError {
    match e {
        SagaError::Decode { .. } | SagaError::Invalid(_) | SagaError::Empty(_) => {
            HandlerError::permanent(e)
        }
        SagaError::Events(ref inner) if inner.is_invalid_input() => HandlerError::permanent(e),
        other => HandlerError::transient(other),
    }
}

/// Runs the orchestrator of `def` until `cancel`: the transition worker and
/// the timeout consumer. Start as many replicas as you like: the worker is
/// pinned to one replica at a time, and every write they make is guarded by
/// optimistic concurrency on the saga's log, so an instance never advances
/// twice.
pub async fn run_orchestrator<D>(
    store: &EventStore,
    def: Arc<Definition<D>>,
    mut config: OrchestratorConfig,
    cancel: CancellationToken,
) -> Result<(), SagaError>
where
    D: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    ensure_timers_stream(store, config.replicas).await?;
    config.worker.filter_subjects = vec![format!(
        "{}.{SAGA_CATEGORY_PREFIX}{}.>",
        store.config().subject_prefix,
        def.name()
    )];
    let cache = Arc::new(StateCache::new());
    let handler = {
        let store = store.clone();
        let def = def.clone();
        move |d: Delivery| {
            let store = store.clone();
            let def = def.clone();
            let cache = cache.clone();
            async move {
                on_transition(&store, &def, &cache, &d)
                    .await
                    .map_err(classify)
            }
        }
    };
    let worker = sluice_workers::run(store, config.worker.clone(), handler, cancel.clone());
    let timers = run_timers(store, &def, &config, cancel.clone());
    let dead = run_dead_letters(store, &def, &config, cancel.clone());
    let (w, t, dl) = tokio::join!(
        async {
            let r = worker.await.map_err(SagaError::from);
            // One half stopping (error) stops the other.
            cancel.cancel();
            r
        },
        async {
            let r = timers.await;
            cancel.cancel();
            r
        },
        async {
            let r = dead.await;
            cancel.cancel();
            r
        }
    );
    w.and(t).and(dl)
}

async fn run_timers<D: DeserializeOwned + Clone>(
    store: &EventStore,
    def: &Definition<D>,
    config: &OrchestratorConfig,
    cancel: CancellationToken,
) -> Result<(), SagaError> {
    let saga = def.name();
    let nats = |doing, e: &dyn std::fmt::Display| SagaError::Nats {
        doing,
        reason: e.to_string(),
    };
    let stream = store
        .stream_named(TIMERS_STREAM)
        .await
        .map_err(|e| nats("opening SAGA_TIMERS", &e))?;
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            &config.timers_consumer,
            consumer::pull::Config {
                durable_name: Some(config.timers_consumer.clone()),
                filter_subject: format!("{TIMERS_PREFIX}.fired.{saga}.>"),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| nats("creating the timers consumer", &e))?;
    if config.worker.take_over_on_start {
        // The only orchestrator there is (`sluice up`): a fired timeout the
        // dead process held comes back now, not after its ack wait.
        if let Err(e) = stream.reset_consumer(&config.timers_consumer, None).await {
            tracing::warn!(consumer = %config.timers_consumer, error = %e, "could not reset the timers consumer at start; fired timeouts in flight come back after the ack wait");
        }
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| nats("pulling timers", &e))?;
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            m = messages.next() => m,
        };
        let Some(message) = next else {
            return Err(nats("pulling timers", &"the consumer stream ended"));
        };
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "timer pull failed; continuing");
                continue;
            }
        };
        let timer: Timer = match serde_json::from_slice(&message.payload) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, subject = %message.subject, "malformed timer; dropping it");
                let _ = message.ack_with(AckKind::Term).await;
                continue;
            }
        };
        let recorded = match timer.deadline {
            Some(armed) => record_deadline(store, def, &timer.saga_id, armed).await,
            None => record_timeout(store, saga, &timer.saga_id, timer.step, timer.attempt).await,
        };
        match recorded {
            Ok(outcome) => {
                tracing::info!(saga, saga_id = %timer.saga_id, step = timer.step, attempt = timer.attempt, overall = timer.deadline.is_some(), ?outcome, "deadline fired");
                if let Err(e) = message.ack().await {
                    tracing::warn!(error = %e, "timer ack failed; it will be redelivered (harmless)");
                }
            }
            Err(e) => {
                tracing::warn!(saga, saga_id = %timer.saga_id, error = %e, "timeout not recorded; retrying");
                let _ = message
                    .ack_with(AckKind::Nak(Some(config.timer_retry)))
                    .await;
            }
        }
    }
}

/// Reads the dead letters of the saga's command handlers
/// (`dlq.<consumer>.cmd-*` in `DLQ`, read only) and records each command
/// the saga waits for as [`SagaEvent::CommandDeadLettered`]. The dead
/// letter stays in the DLQ for the operator; this only tells the saga.
async fn run_dead_letters<D: DeserializeOwned + Clone>(
    store: &EventStore,
    def: &Definition<D>,
    config: &OrchestratorConfig,
    cancel: CancellationToken,
) -> Result<(), SagaError> {
    use sluice_workers::{DLQ_PREFIX, DLQ_STREAM, headers as h};
    if config.command_consumers.is_empty() {
        cancel.cancelled().await;
        return Ok(());
    }
    let nats = |doing, e: &dyn std::fmt::Display| SagaError::Nats {
        doing,
        reason: e.to_string(),
    };
    // The worker runtime creates `DLQ`; wait for it rather than create it
    // here with settings that are not ours to choose.
    let stream = loop {
        match store.stream_named(DLQ_STREAM).await {
            Ok(s) => break s,
            Err(_) => {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        }
    };
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            &config.dead_letters_consumer,
            consumer::pull::Config {
                durable_name: Some(config.dead_letters_consumer.clone()),
                filter_subjects: config
                    .command_consumers
                    .iter()
                    .map(|c| format!("{DLQ_PREFIX}.{c}.>"))
                    .collect(),
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| nats("creating the dead-letter consumer", &e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| nats("pulling dead letters", &e))?;
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            m = messages.next() => m,
        };
        let Some(message) = next else {
            return Err(nats("pulling dead letters", &"the consumer stream ended"));
        };
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "dead-letter pull failed; continuing");
                continue;
            }
        };
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|hm| hm.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let category = message.subject.split('.').nth(2).unwrap_or_default();
        let dead_letter = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        if !category.starts_with(crate::log::COMMAND_CATEGORY_PREFIX) {
            let _ = message.ack().await;
            continue;
        }
        let decoded = match serde_json::from_slice::<CommandMessage>(&message.payload) {
            Ok(m) => Some(m),
            // The copy may hold less than the original (a dead letter stored
            // by reference): read the original from its stream.
            Err(_) => original_command(store, header(h::STREAM), header(h::SEQUENCE)).await,
        };
        let Some(command) = decoded.filter(|m| m.saga == def.name()) else {
            // Not this saga's, or not a command at all (a malformed one has
            // no saga to tell; the operator sees it in the DLQ).
            let _ = message.ack().await;
            continue;
        };
        let dead = DeadCommand {
            consumer: header(h::CONSUMER).unwrap_or_default(),
            reason: header(h::REASON).unwrap_or_default(),
            dead_letter,
            message: command,
        };
        match record_dead_letter(store, def, &dead).await {
            Ok(outcome) => {
                tracing::warn!(saga = def.name(), saga_id = %dead.message.saga_id, command = %dead.message.command.id, dead_letter, ?outcome, "command dead-lettered");
                if let Err(e) = message.ack().await {
                    tracing::warn!(error = %e, "dead-letter ack failed; it will be redelivered (harmless)");
                }
            }
            Err(e) => {
                tracing::warn!(saga = def.name(), dead_letter, error = %e, "dead-lettered command not recorded; retrying");
                let _ = message
                    .ack_with(AckKind::Nak(Some(config.timer_retry)))
                    .await;
            }
        }
    }
}

/// The original command of a dead letter, read from its stream by sequence.
async fn original_command(
    store: &EventStore,
    stream: Option<String>,
    sequence: Option<String>,
) -> Option<CommandMessage> {
    let sequence: u64 = sequence?.parse().ok()?;
    let stream = store.stream_named(&stream?).await.ok()?;
    let raw = stream.get_raw_message(sequence).await.ok()?;
    serde_json::from_slice(&raw.payload).ok()
}
