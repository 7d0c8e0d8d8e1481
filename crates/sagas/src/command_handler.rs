//! Command handlers: workers on `events.cmd-<category>.>` that load the
//! target aggregate, decide, append, and reply to the saga's log.
//!
//! Exactly-once effect per command, across resends, redeliveries, crashes
//! and late arrivals:
//! 1. A command whose reply (or, for an action, whose timeout) is already in
//!    the saga's log is acknowledged and ignored.
//! 2. An accepted action is *claimed* in the saga's log before its effect is
//!    appended (guarded append): a claim and a timeout exclude each other, so
//!    a late command never takes effect after its saga compensated.
//! 3. The effect's events carry `ce-causationid` = the command's effect key
//!    (`<saga-id>/<step>[/undo]`, no attempt); a handler that finds it on the
//!    target replies success without appending again.
//! 4. The reply is a guarded append too; a duplicate reply is refused.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;
use sluice_events::{Aggregate, EventId, EventStore, ExpectedVersion, StreamId};
use sluice_workers::{Delivery, HandlerError, WorkerConfig};
use tokio_util::sync::CancellationToken;

use crate::log::{
    COMMAND, COMMAND_CATEGORY_PREFIX, CommandMessage, CommandStatus, Guarded, append_guarded,
};
use crate::model::{CommandKind, SagaError, SagaEvent};

/// Turns a saga command into the aggregate's command (the target id comes
/// from the payload's `target`); `Err` is a permanent rejection reason.
pub type CommandMapper<A> = fn(&crate::model::Command) -> Result<<A as Aggregate>::Command, String>;
/// Builds the success reply from the aggregate's state after the command.
pub type ReplyBuilder<A> = fn(&A) -> Value;

/// Transient failures of a compensation handled by the worker's own backoff
/// before the handler records one in the saga's log (which sends the next
/// attempt as a fresh command, so retries go on with no attempt limit).
const TRANSIENT_ATTEMPTS_PER_COMPENSATION: u64 = 3;
/// Conflicts on the target aggregate before giving up as transient.
const MAX_CONFLICTS: usize = 16;

/// What handling one command amounted to (for logs and tests).
#[derive(Debug, Clone, PartialEq)]
pub enum Handled {
    /// Already answered, timed out, or unknown saga: nothing done.
    Ignored(&'static str),
    /// Applied (or found applied) and answered with success.
    Succeeded,
    /// Refused by the aggregate and answered with that reason.
    Rejected(String),
}

/// Aggregates this handler folded, by stream: state, version and the effect
/// keys found on them. A decision from the cache is only ever *written* with
/// `Exact(version)`, so a stale entry costs a conflict and a reload, never a
/// wrong write; a refusal (which writes nothing) is only trusted from a fresh
/// load. Effect keys only ever accumulate, so "already applied" is true when
/// the cache says so.
pub(crate) struct AggregateCache<A> {
    entries: std::sync::Mutex<HashMap<String, Cached<A>>>,
}

struct Cached<A> {
    state: A,
    version: u64,
    keys: HashSet<String>,
    /// Loaded by this very command (not from the cache).
    fresh: bool,
}

/// Aggregates kept before the cache is emptied.
const CACHED_AGGREGATES: usize = 10_000;

impl<A> AggregateCache<A> {
    pub(crate) fn new() -> Self {
        Self {
            entries: std::sync::Mutex::new(HashMap::new()),
        }
    }

    // Commands for one target share a subject, which worker lanes handle one
    // at a time: taking the entry out while deciding never races with
    // another command for the same aggregate in this process.
    fn take(&self, key: &str) -> Option<Cached<A>> {
        let mut entry = self.entries.lock().ok()?.remove(key)?;
        entry.fresh = false;
        Some(entry)
    }

    fn put(&self, key: String, entry: Cached<A>) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= CACHED_AGGREGATES {
                entries.clear();
            }
            entries.insert(key, entry);
        }
    }
}

/// What a handler knows of the saga's log without reading it: at `.0` the
/// command stands at `.1`.
type Known = Option<(u64, CommandStatus)>;

/// Handles one command message for aggregate `A`.
pub async fn handle_command<A: Aggregate>(
    store: &EventStore,
    msg: &CommandMessage,
    map: CommandMapper<A>,
    reply: ReplyBuilder<A>,
) -> Result<Handled, SagaError> {
    handle::<A>(store, msg, map, reply, &AggregateCache::new()).await
}

async fn handle<A: Aggregate>(
    store: &EventStore,
    msg: &CommandMessage,
    map: CommandMapper<A>,
    reply: ReplyBuilder<A>,
    cache: &AggregateCache<A>,
) -> Result<Handled, SagaError> {
    let cmd = &msg.command;
    let (saga, saga_id) = (msg.saga.as_str(), msg.saga_id.as_str());
    let mut known: Known = match (cmd.kind, msg.log_version) {
        // An action is open at the transition that issued it; if the log
        // moved since (a timeout, an earlier delivery's claim or reply), the
        // claim's append conflicts and the guard is checked on a fresh read.
        (CommandKind::Action, Some(version)) => Some((version, CommandStatus::Open)),
        _ => {
            let log = crate::log::read_log(store, saga, saga_id).await?;
            let status = log.command_status(cmd.kind, cmd.step, cmd.attempt);
            match status {
                CommandStatus::Answered => return Ok(Handled::Ignored("already answered")),
                CommandStatus::TimedOut => {
                    return Ok(Handled::Ignored("timed out before it was taken"));
                }
                CommandStatus::DeadLettered => {
                    return Ok(Handled::Ignored(
                        "dead-lettered: the saga needs attention; an operator retry sends it again",
                    ));
                }
                CommandStatus::Closed => {
                    return Ok(Handled::Ignored(
                        "an operator resolved or abandoned the saga",
                    ));
                }
                CommandStatus::Open | CommandStatus::Claimed => {}
            }
            Some((log.version, status))
        }
    };
    let target = crate::log::command_target(cmd)?;
    if target.category() != A::CATEGORY {
        return Err(SagaError::Invalid(format!(
            "command {} targets {} but this handler serves {}",
            cmd.id,
            target.category(),
            A::CATEGORY
        )));
    }
    let effect_key = cmd.effect_key(saga_id);
    let outcome = match map(cmd) {
        Err(reason) => Err(reason),
        Ok(command) => {
            apply::<A>(
                store,
                &target,
                msg,
                &command,
                &effect_key,
                reply,
                cache,
                &mut known,
            )
            .await?
        }
    };
    let outcome = match outcome {
        Ok(Some(reply)) => Ok(reply),
        Ok(None) => return Ok(Handled::Ignored("timed out before it was claimed")),
        Err(reason) => Err(reason),
    };
    let (kind, step, attempt) = (cmd.kind, cmd.step, cmd.attempt);
    let reply_event = match (&outcome, kind) {
        (Ok(reply), CommandKind::Action) => SagaEvent::StepSucceeded {
            step,
            attempt,
            reply: reply.clone(),
        },
        (Err(reason), CommandKind::Action) => SagaEvent::StepFailed {
            step,
            attempt,
            reason: reason.clone(),
        },
        (Ok(_), CommandKind::Compensation) => SagaEvent::CompensationSucceeded { step, attempt },
        (Err(reason), CommandKind::Compensation) => SagaEvent::CompensationFailed {
            step,
            attempt,
            reason: reason.clone(),
            permanent: true,
        },
    };
    let reply_id = format!("{}/reply", cmd.id);
    let (guarded, _) = append_for(store, msg, known, |status| match status {
        CommandStatus::Open | CommandStatus::Claimed => Ok((reply_event.clone(), reply_id.clone())),
        CommandStatus::Answered => Err("already answered"),
        CommandStatus::TimedOut => Err("timed out"),
        CommandStatus::DeadLettered => Err("dead-lettered"),
        CommandStatus::Closed => Err("closed by an operator"),
    })
    .await?;
    if let Guarded::Refused(why) = guarded {
        // A rejection after a timeout is harmless: nothing was applied.
        return Ok(Handled::Ignored(why));
    }
    Ok(match outcome {
        Ok(_) => Handled::Succeeded,
        Err(reason) => Handled::Rejected(reason),
    })
}

/// Appends what `decide` says for the command's status to the saga's log:
/// against the known version without a read when there is one, else (or
/// when the log moved) as a guarded append. Also returns the log's new
/// version when it is certain (a fresh append at the known version).
async fn append_for(
    store: &EventStore,
    msg: &CommandMessage,
    known: Known,
    decide: impl Fn(CommandStatus) -> Result<(SagaEvent, String), &'static str>,
) -> Result<(Guarded, Option<u64>), SagaError> {
    let (saga, saga_id) = (msg.saga.as_str(), msg.saga_id.as_str());
    let cmd = &msg.command;
    if let Some((version, status)) = known {
        let (event, id) = match decide(status) {
            Ok(x) => x,
            Err(why) => return Ok((Guarded::Refused(why), None)),
        };
        match crate::log::append_at(store, saga, saga_id, version, &event, &id).await? {
            Some(r) if !r.deduplicated => {
                return Ok((Guarded::Appended(r.version), Some(r.version)));
            }
            // A deduplicated append says an earlier delivery wrote the event,
            // not where the log stands now: an operator may have resolved or
            // abandoned the saga since, so the guard is checked on a fresh
            // read (a claim found there is this command's own).
            Some(_) | None => {}
        }
        tracing::debug!(saga, saga_id, command = %cmd.id, "saga log moved; checking the guard on a fresh read");
    }
    let (kind, step, attempt) = (cmd.kind, cmd.step, cmd.attempt);
    let guarded = append_guarded(store, saga, saga_id, |log| {
        decide(log.command_status(kind, step, attempt))
    })
    .await?;
    Ok((guarded, None))
}

/// Load (or take from the cache) → (already applied?) → decide → claim →
/// append, reloading on conflicts. `Ok(Ok(None))`: the action timed out
/// before it was claimed.
#[allow(clippy::too_many_arguments)]
async fn apply<A: Aggregate>(
    store: &EventStore,
    target: &StreamId,
    msg: &CommandMessage,
    command: &A::Command,
    effect_key: &str,
    reply: ReplyBuilder<A>,
    cache: &AggregateCache<A>,
    known: &mut Known,
) -> Result<Result<Option<Value>, String>, SagaError> {
    let cmd = &msg.command;
    let key = target.to_string();
    let mut cached = cache.take(&key);
    let mut claimed = false;
    for _ in 0..MAX_CONFLICTS {
        let entry = match cached.take() {
            Some(e) => e,
            None => match load_with_keys::<A>(store, target).await {
                Ok(e) => e,
                // A bad event in the target's log refuses the command (its
                // reason names the position to void); retrying cannot help.
                Err(SagaError::Events(e)) if e.stored_event_position().is_some() => {
                    return Ok(Err(e.to_string()));
                }
                Err(e) => return Err(e),
            },
        };
        if entry.keys.contains(effect_key) {
            let value = reply(&entry.state);
            cache.put(key, entry);
            return Ok(Ok(Some(value)));
        }
        let events = match entry.state.decide(command) {
            Ok(events) if !events.is_empty() => events,
            // Refusing (or doing nothing) writes nothing, so no conflict
            // would reveal a stale state: decide again on a fresh load.
            _ if !entry.fresh => continue,
            Ok(_) => {
                let value = reply(&entry.state);
                cache.put(key, entry);
                return Ok(Ok(Some(value)));
            }
            Err(rejection) => {
                cache.put(key, entry);
                return Ok(Err(rejection.to_string()));
            }
        };
        if cmd.kind == CommandKind::Action && !claimed {
            let claim_id = format!("{}/claim", cmd.id);
            let step = cmd.step;
            let attempt = cmd.attempt;
            let (guarded, version) = append_for(store, msg, *known, |status| match status {
                CommandStatus::Open => {
                    Ok((SagaEvent::StepClaimed { step, attempt }, claim_id.clone()))
                }
                CommandStatus::Claimed => Err("claimed"),
                CommandStatus::TimedOut => Err("timed out"),
                CommandStatus::Answered => Err("answered"),
                CommandStatus::DeadLettered => Err("dead-lettered"),
                CommandStatus::Closed => Err("closed by an operator"),
            })
            .await?;
            match guarded {
                Guarded::Appended(_) | Guarded::Refused("claimed") => {
                    claimed = true;
                    *known = version.map(|v| (v, CommandStatus::Claimed));
                }
                Guarded::Refused(_) => {
                    cache.put(key, entry);
                    return Ok(Ok(None));
                }
            }
        }
        let mut encoded = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            // Not the command's own id: the command is an event in the same
            // stream, and the server would take the effect for its duplicate.
            let id = format!("{}/effect/{i}", cmd.id);
            encoded.push(
                A::encode(e)?
                    .with_id(EventId::parse(&id)?)
                    .with_correlation_id(msg.saga_id.clone())
                    .with_causation_id(effect_key),
            );
        }
        let Cached {
            state,
            version,
            mut keys,
            ..
        } = entry;
        match store
            .append(target, ExpectedVersion::from_version(version), encoded)
            .await
        {
            Ok(r) => {
                let state = events.iter().fold(state, sluice_events::Aggregate::evolve);
                let value = reply(&state);
                // A deduplicated append means an earlier try landed; what
                // is on the target then is unknown here: load it next time.
                if !r.deduplicated {
                    keys.insert(effect_key.to_owned());
                    cache.put(
                        key,
                        Cached {
                            state,
                            version: r.version,
                            keys,
                            fresh: false,
                        },
                    );
                }
                return Ok(Ok(Some(value)));
            }
            // An effect id already on the target (an earlier try): the
            // fresh load below finds it.
            Err(e) if e.is_conflict() || e.is_id_reused() => {
                tracing::debug!(target = %target, command = %cmd.id, "target moved; deciding again");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(SagaError::Events(sluice_events::Error::Conflict {
        stream: target.to_string(),
        expected: 0,
        actual: 0,
    }))
}

/// Loads an aggregate with the effect keys (causation ids) found on it.
async fn load_with_keys<A: Aggregate>(
    store: &EventStore,
    target: &StreamId,
) -> Result<Cached<A>, SagaError> {
    let history = store.history_direct(target).await?;
    let mut state = A::default();
    let mut keys = HashSet::new();
    for recorded in &history.events {
        if let Some(key) = &recorded.envelope.causation_id {
            keys.insert(key.clone());
        }
        state = state.evolve(&recorded.decoded(A::decode(&recorded.envelope))?);
    }
    Ok(Cached {
        state,
        version: history.version,
        keys,
        fresh: true,
    })
}

/// Records a transient compensation failure in the saga's log, so the next
/// attempt goes out as a fresh command.
async fn record_transient(
    store: &EventStore,
    msg: &CommandMessage,
    reason: String,
) -> Result<(), SagaError> {
    let (step, attempt) = (msg.command.step, msg.command.attempt);
    let id = format!("{}/reply", msg.command.id);
    append_guarded(store, &msg.saga, &msg.saga_id, |log| {
        match log.command_status(CommandKind::Compensation, step, attempt) {
            CommandStatus::Open => Ok((
                SagaEvent::CompensationFailed {
                    step,
                    attempt,
                    reason: reason.clone(),
                    permanent: false,
                },
                id.clone(),
            )),
            _ => Err("already answered"),
        }
    })
    .await?;
    Ok(())
}

/// The worker handler for commands on aggregate `A`.
async fn on_delivery<A: Aggregate>(
    store: &EventStore,
    d: Delivery,
    map: CommandMapper<A>,
    reply: ReplyBuilder<A>,
    cache: &AggregateCache<A>,
) -> Result<(), HandlerError> {
    if d.envelope.event_type != COMMAND {
        return Err(HandlerError::unknown_type(&d.envelope));
    }
    let msg: CommandMessage = d
        .envelope
        .data_as()
        .map_err(|e| HandlerError::permanent(format!("malformed saga command: {e}")))?;
    match handle::<A>(store, &msg, map, reply, cache).await {
        Ok(handled) => {
            tracing::debug!(saga = %msg.saga, saga_id = %msg.saga_id, command = %msg.command.id, ?handled, "command handled");
            Ok(())
        }
        Err(e @ (SagaError::Invalid(_) | SagaError::Decode { .. })) => {
            Err(HandlerError::permanent(e))
        }
        Err(e)
            if msg.command.kind == CommandKind::Compensation
                && d.attempt >= TRANSIENT_ATTEMPTS_PER_COMPENSATION =>
        {
            tracing::warn!(saga = %msg.saga, saga_id = %msg.saga_id, command = %msg.command.id, error = %e, "compensation failing transiently; recording it so the next attempt goes out");
            record_transient(store, &msg, e.to_string())
                .await
                .map_err(HandlerError::transient)
        }
        Err(e) => Err(HandlerError::transient(e)),
    }
}

/// Runs the command handler of aggregate `A` until `cancel`: a worker on
/// `events.cmd-<A::CATEGORY>.>` (the filter is set here; the worker name in
/// `config` is its durable identity).
pub async fn run_command_handler<A: Aggregate + 'static>(
    store: &EventStore,
    mut config: WorkerConfig,
    map: CommandMapper<A>,
    reply: ReplyBuilder<A>,
    cancel: CancellationToken,
) -> Result<(), SagaError> {
    if config.filter_subjects == WorkerConfig::new(config.name).filter_subjects {
        config.filter_subjects = vec![format!(
            "{}.{COMMAND_CATEGORY_PREFIX}{}.>",
            store.config().subject_prefix,
            A::CATEGORY
        )];
    }
    let store = Arc::new(store.clone());
    let cache = Arc::new(AggregateCache::<A>::new());
    let handler = {
        let store = store.clone();
        move |d: Delivery| {
            let store = store.clone();
            let cache = cache.clone();
            async move { on_delivery::<A>(&store, d, map, reply, &cache).await }
        }
    };
    sluice_workers::run(&store, config, handler, cancel).await?;
    Ok(())
}
