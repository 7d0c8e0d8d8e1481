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
    append_guarded, command_target, read_log,
};
use crate::model::{Command, CommandKind, Definition, SagaError, SagaEvent};

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
    let target = command_target(command)?;
    let subject = sluice_events::StreamId::new(
        format!("{COMMAND_CATEGORY_PREFIX}{}", target.category()),
        target.id(),
    )?;
    let msg = CommandMessage {
        saga: saga.to_owned(),
        saga_id: saga_id.to_owned(),
        command: command.clone(),
    };
    let event = NewEvent::json(COMMAND, &msg)?
        .with_id(EventId::parse(&command.id)?)
        .with_source("urn:sluice:saga")
        .with_correlation_id(saga_id);
    store
        .append(&subject, ExpectedVersion::Any, vec![event])
        .await?;
    Ok(())
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

/// Handles one stored transition: sends its commands and schedules their
/// deadlines. Its span is a child of the worker's, which continues the
/// transition's `ce-traceparent`; the commands it appends carry it on.
#[tracing::instrument(name = "saga.step", skip_all, fields(saga = def.name(), saga_id = %saga_id, position = position))]
async fn on_transition<D>(
    store: &EventStore,
    def: &Definition<D>,
    saga_id: &str,
    position: u64,
) -> Result<(), SagaError>
where
    D: DeserializeOwned + Clone,
{
    let log = read_log(store, def.name(), saga_id).await?;
    let Some(index) = log.records.iter().position(|r| r.position == position) else {
        return Ok(());
    };
    let (_, commands) = log.fold(def)?;
    let record = &log.records[index];
    // Deadlines count from the transition, not from whenever an orchestrator
    // got to it, so a resend after a crash schedules the same due time.
    let from = record
        .time
        .as_deref()
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        .unwrap_or_else(OffsetDateTime::now_utc);
    for command in &commands[index] {
        send_command(store, def.name(), saga_id, command).await?;
        tracing::info!(saga = def.name(), saga_id, command = %command.id, kind = ?command.kind, "command sent");
        if let (CommandKind::Action, Some(deadline)) = (command.kind, command.deadline) {
            let now = OffsetDateTime::now_utc();
            // A deadline already past (the orchestrator was down) fires at
            // once; the server wants a time in the future.
            let due = (from + deadline).max(now + Duration::from_secs(1));
            schedule_timeout(store.jetstream(), def.name(), saga_id, command, due).await?;
        }
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
    let handler = {
        let store = store.clone();
        let def = def.clone();
        move |d: Delivery| {
            let store = store.clone();
            let def = def.clone();
            async move {
                on_transition(&store, &def, d.stream_id.id(), d.sequence)
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
