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
use async_nats::jetstream::{self, AckKind, consumer, stream};
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
use crate::model::{Command, CommandKind, Definition, SagaError, SagaEvent, SagaState, react};

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
        }
    }
}

#[derive(Serialize, serde::Deserialize)]
struct Timer {
    saga: String,
    saga_id: String,
    step: usize,
    attempt: u32,
}

/// Creates `SAGA_TIMERS` (message schedules allowed) if missing.
pub async fn ensure_timers_stream(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<(), SagaError> {
    if js.get_stream(TIMERS_STREAM).await.is_ok() {
        return Ok(());
    }
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
    match js.create_stream(config).await {
        Ok(_) => Ok(()),
        Err(_) if js.get_stream(TIMERS_STREAM).await.is_ok() => Ok(()),
        Err(e) => Err(SagaError::Nats {
            doing: "creating the SAGA_TIMERS stream",
            reason: e.to_string(),
        }),
    }
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
    js: &jetstream::Context,
    saga: &str,
    saga_id: &str,
    command: &Command,
    due: OffsetDateTime,
) -> Result<(), SagaError> {
    let nats = |doing, e: &dyn std::fmt::Display| SagaError::Nats {
        doing,
        reason: e.to_string(),
    };
    let suffix = format!("{saga}.{saga_id}.{}.{}", command.step, command.attempt);
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
    headers.insert("Nats-Msg-Id", format!("timer:{}", command.id).as_str());
    let body = serde_json::to_vec(&Timer {
        saga: saga.to_owned(),
        saga_id: saga_id.to_owned(),
        step: command.step,
        attempt: command.attempt,
    })
    .map_err(|e| nats("encoding a timer", &e))?;
    js.publish_with_headers(format!("{TIMERS_PREFIX}.at.{suffix}"), headers, body.into())
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
        }
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
    for command in &commands {
        let send = send_command_at(store, def.name(), saga_id, command, Some(position));
        let schedule = async {
            if let (CommandKind::Action, Some(deadline)) = (command.kind, command.deadline) {
                let now = OffsetDateTime::now_utc();
                // A deadline already past (the orchestrator was down) fires
                // at once; the server wants a time in the future.
                let due = (from + deadline).max(now + Duration::from_secs(1));
                schedule_timeout(store.jetstream(), def.name(), saga_id, command, due).await?;
            }
            Ok::<_, SagaError>(())
        };
        // Independent writes: the command and its deadline go out together.
        futures::try_join!(send, schedule)?;
        tracing::debug!(saga = def.name(), saga_id, command = %command.id, kind = ?command.kind, "command sent");
    }
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
    ensure_timers_stream(store.jetstream(), config.replicas).await?;
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
    let timers = run_timers(store, def.name(), &config, cancel.clone());
    let (w, t) = tokio::join!(
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
        }
    );
    w.and(t)
}

async fn run_timers(
    store: &EventStore,
    saga: &str,
    config: &OrchestratorConfig,
    cancel: CancellationToken,
) -> Result<(), SagaError> {
    let nats = |doing, e: &dyn std::fmt::Display| SagaError::Nats {
        doing,
        reason: e.to_string(),
    };
    let js = store.jetstream();
    let stream = js
        .get_stream(TIMERS_STREAM)
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
        match record_timeout(store, saga, &timer.saga_id, timer.step, timer.attempt).await {
            Ok(outcome) => {
                tracing::info!(saga, saga_id = %timer.saga_id, step = timer.step, attempt = timer.attempt, ?outcome, "deadline fired");
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
