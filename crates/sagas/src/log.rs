//! A saga instance's durable log: `events.saga-<name>.<saga-id>` in `EVENTS`.
//!
//! Every transition is an event on that stream, appended with optimistic
//! concurrency (`Exact(version)`), so the stream is the one arbiter between
//! command handlers (replies, claims), the timer (timeouts) and any number of
//! orchestrator replicas: whoever appends first wins, the others reload and
//! find the question already answered.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sluice_events::{EventId, EventStore, ExpectedVersion, NewEvent, StreamId};

use crate::model::{
    Command, CommandKind, Definition, Outcome, SagaError, SagaEvent, SagaState, react,
};

/// Category prefix of saga streams: `saga-<name>`.
pub const SAGA_CATEGORY_PREFIX: &str = "saga-";
/// Category prefix of command subjects: `events.cmd-<category>.<target-id>`.
pub const COMMAND_CATEGORY_PREFIX: &str = "cmd-";

/// `sluice.saga.started.v1` `{ "data": <the flow's data> }`.
pub const STARTED: &str = "sluice.saga.started.v1";
/// `sluice.saga.step_claimed.v1` `{ "event": "step_claimed", "step", "attempt" }`.
pub const STEP_CLAIMED: &str = "sluice.saga.step_claimed.v1";
/// `sluice.saga.step_succeeded.v1`.
pub const STEP_SUCCEEDED: &str = "sluice.saga.step_succeeded.v1";
/// `sluice.saga.step_failed.v1`.
pub const STEP_FAILED: &str = "sluice.saga.step_failed.v1";
/// `sluice.saga.step_timed_out.v1`.
pub const STEP_TIMED_OUT: &str = "sluice.saga.step_timed_out.v1";
/// `sluice.saga.retried.v1` (an operator's retry of a saga in `needs_attention`).
pub const RETRIED: &str = "sluice.saga.retried.v1";
/// `sluice.saga.resolved.v1` (an operator states the outcome of a saga in
/// `needs_attention`).
pub const RESOLVED: &str = "sluice.saga.resolved.v1";
/// `sluice.saga.abandoned.v1` (an operator stops a saga in `needs_attention`).
pub const ABANDONED: &str = "sluice.saga.abandoned.v1";
/// `sluice.saga.command_dead_lettered.v1` (the command the saga waits for
/// was dead-lettered).
pub const COMMAND_DEAD_LETTERED: &str = "sluice.saga.command_dead_lettered.v1";
/// `sluice.saga.deadline_passed.v1` (the instance's overall deadline).
pub const DEADLINE_PASSED: &str = "sluice.saga.deadline_passed.v1";
/// `sluice.saga.compensation_succeeded.v1`.
pub const COMPENSATION_SUCCEEDED: &str = "sluice.saga.compensation_succeeded.v1";
/// `sluice.saga.compensation_failed.v1`.
pub const COMPENSATION_FAILED: &str = "sluice.saga.compensation_failed.v1";
/// `sluice.saga.command.v1`: a [`CommandMessage`] on `events.cmd-<category>.<id>`.
pub const COMMAND: &str = "sluice.saga.command.v1";

/// How many times a guarded append reloads after losing a race.
const MAX_RACES: usize = 32;

/// The wire name of a saga event.
pub fn event_type(event: &SagaEvent) -> &'static str {
    match event {
        SagaEvent::Started => STARTED,
        SagaEvent::StepClaimed { .. } => STEP_CLAIMED,
        SagaEvent::StepSucceeded { .. } => STEP_SUCCEEDED,
        SagaEvent::StepFailed { .. } => STEP_FAILED,
        SagaEvent::StepTimedOut { .. } => STEP_TIMED_OUT,
        SagaEvent::Retried { .. } => RETRIED,
        SagaEvent::Resolved { .. } => RESOLVED,
        SagaEvent::Abandoned { .. } => ABANDONED,
        SagaEvent::CommandDeadLettered { .. } => COMMAND_DEAD_LETTERED,
        SagaEvent::DeadlinePassed { .. } => DEADLINE_PASSED,
        SagaEvent::CompensationSucceeded { .. } => COMPENSATION_SUCCEEDED,
        SagaEvent::CompensationFailed { .. } => COMPENSATION_FAILED,
    }
}

/// The stream of instance `id` of saga `name`.
pub fn saga_stream(name: &str, id: &str) -> Result<StreamId, SagaError> {
    Ok(StreamId::new(format!("{SAGA_CATEGORY_PREFIX}{name}"), id)?)
}

/// What travels on a command subject.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct CommandMessage {
    /// The saga's name (which stream to reply to).
    pub saga: String,
    /// The saga instance.
    pub saga_id: String,
    /// The command.
    pub command: Command,
    /// The log version at which the command was issued (the position of the
    /// transition that produced it). A handler appends its claim or reply
    /// expecting exactly this version and reads the log only if it moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_version: Option<u64>,
}

/// The aggregate a command targets, from its payload's `target`
/// (`{"category": "account", "id": "acc-1"}`).
pub fn command_target(command: &Command) -> Result<StreamId, SagaError> {
    let target = &command.payload["target"];
    let (Some(category), Some(id)) = (target["category"].as_str(), target["id"].as_str()) else {
        return Err(SagaError::Invalid(format!(
            "command {} has no payload.target {{category, id}}",
            command.id
        )));
    };
    Ok(StreamId::new(category, id)?)
}

/// One stored transition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SagaRecord {
    /// Its position in `EVENTS`.
    pub position: u64,
    /// Its event id.
    pub id: String,
    /// When it was appended (RFC 3339).
    pub time: Option<String>,
    /// The log version its writer checked its guard against (the position of
    /// the transition before it; 0 for `Started`). `None` for events written
    /// before this was recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// The transition.
    pub event: SagaEvent,
}

/// A stored saga event as a read model sees it (see [`observe`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Observed<D> {
    /// The instance started, with the flow's data.
    Started(D),
    /// Any later transition.
    Transition(SagaEvent),
}

/// Decodes one saga event of an instance's stream for a read model: the
/// flow's data (`what`, e.g. "order", names it in errors) on `Started`, the
/// transition otherwise. The error is a dead-letter reason.
///
/// ```
/// use sluice_events::{Envelope, EventId};
/// use sluice_sagas::{Observed, RETRIED, STARTED, SagaEvent, observe};
///
/// let env = |t: &str, data: &str| Envelope {
///     id: EventId::new(),
///     event_type: t.to_owned(),
///     source: "urn:test".to_owned(),
///     time: None,
///     subject: None,
///     data: data.as_bytes().to_vec().into(),
///     correlation_id: None,
///     causation_id: None,
///     traceparent: None,
/// };
/// let start = observe::<u32>(&env(STARTED, r#"{"data": 7}"#), "count");
/// assert_eq!(start, Ok(Observed::Started(7)));
/// let retried = env(RETRIED, r#"{"event": "retried", "note": "by hand"}"#);
/// let retried = observe::<u32>(&retried, "count");
/// assert!(matches!(retried, Ok(Observed::Transition(SagaEvent::Retried { .. }))));
/// let bad = observe::<u32>(&env(STARTED, r#"{"data": "x"}"#), "count");
/// assert!(bad.unwrap_err().starts_with("malformed count data"));
/// ```
pub fn observe<D: DeserializeOwned>(
    env: &sluice_events::Envelope,
    what: &str,
) -> Result<Observed<D>, String> {
    if env.event_type == STARTED {
        let v: Value = serde_json::from_slice(&env.data)
            .map_err(|e| format!("malformed {STARTED} data: {e}"))?;
        let data = serde_json::from_value(v["data"].clone())
            .map_err(|e| format!("malformed {what} data: {e}"))?;
        return Ok(Observed::Started(data));
    }
    serde_json::from_slice(&env.data)
        .map(Observed::Transition)
        .map_err(|e| {
            let t: String = env.event_type.chars().take(64).collect();
            format!("malformed saga event {t:?}: {e}")
        })
}

/// Decodes one stored saga event (and, for `Started`, the flow's data).
pub(crate) fn decode_record(
    env: &sluice_events::Envelope,
    position: u64,
) -> Result<(SagaRecord, Option<Value>), SagaError> {
    let body: Value = serde_json::from_slice(&env.data).map_err(|e| SagaError::Decode {
        what: "saga event",
        reason: format!("{} at {position}: {e}", env.event_type),
    })?;
    let (event, after, data) = if env.event_type == STARTED {
        let data = body.get("data").cloned().unwrap_or(Value::Null);
        (SagaEvent::Started, Some(0), Some(data))
    } else {
        let after = body.get(AFTER).and_then(Value::as_u64);
        let event = serde_json::from_value(body).map_err(|e| SagaError::Decode {
            what: "saga event",
            reason: format!("{} at {position}: {e}", env.event_type),
        })?;
        (event, after, None)
    };
    let record = SagaRecord {
        position,
        id: env.id.as_str().to_owned(),
        time: env.time_rfc3339(),
        after,
        event,
    };
    Ok((record, data))
}

/// Field of a saga event's data naming the log version it extends.
const AFTER: &str = "after";

/// A saga instance's log as stored, read without its definition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SagaLog {
    /// Saga name.
    pub name: String,
    /// Instance id.
    pub id: String,
    /// The flow's data from `Started` (`Null` if the instance is unknown).
    pub data: Value,
    /// Transitions in order.
    pub records: Vec<SagaRecord>,
    /// Position of the last transition (0 = unknown instance).
    pub version: u64,
}

/// Where one command stands in a saga's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandStatus {
    /// Neither claimed, answered nor timed out.
    Open,
    /// A handler claimed it (actions only).
    Claimed,
    /// Its deadline passed before anyone claimed it: it must not take effect.
    TimedOut,
    /// Its reply is recorded.
    Answered,
    /// The worker runtime dead-lettered it and the saga recorded that: it
    /// must not take effect, and no reply to it counts.
    DeadLettered,
    /// An operator resolved or abandoned the saga before it was answered:
    /// it must not take effect (a redelivery of a claimed action stops
    /// here), and no reply to it counts.
    Closed,
}

impl SagaLog {
    /// Where the command `(kind, step, attempt)` stands.
    pub fn command_status(&self, kind: CommandKind, step: usize, attempt: u32) -> CommandStatus {
        let mut status = CommandStatus::Open;
        for r in &self.records {
            if matches!(
                r.event,
                SagaEvent::Resolved { .. } | SagaEvent::Abandoned { .. }
            ) {
                return CommandStatus::Closed;
            }
            let (s, a, st) = match (&r.event, kind) {
                (
                    SagaEvent::StepSucceeded { step, attempt, .. }
                    | SagaEvent::StepFailed { step, attempt, .. },
                    CommandKind::Action,
                )
                | (
                    SagaEvent::CompensationSucceeded { step, attempt }
                    | SagaEvent::CompensationFailed { step, attempt, .. },
                    CommandKind::Compensation,
                ) => (*step, *attempt, CommandStatus::Answered),
                (
                    SagaEvent::StepTimedOut { step, attempt }
                    | SagaEvent::DeadlinePassed {
                        kind: CommandKind::Action,
                        claimed: false,
                        step,
                        attempt,
                        ..
                    },
                    CommandKind::Action,
                ) => (*step, *attempt, CommandStatus::TimedOut),
                (
                    SagaEvent::CommandDeadLettered {
                        kind: k,
                        step,
                        attempt,
                        ..
                    },
                    _,
                ) if *k == kind => (*step, *attempt, CommandStatus::DeadLettered),
                (SagaEvent::StepClaimed { step, attempt }, CommandKind::Action) => {
                    (*step, *attempt, CommandStatus::Claimed)
                }
                _ => continue,
            };
            if s == step && a == attempt {
                // Answered, TimedOut and DeadLettered are final; a claim
                // only upgrades Open.
                match st {
                    CommandStatus::Claimed if status == CommandStatus::Open => status = st,
                    CommandStatus::Claimed => {}
                    _ => return st,
                }
            }
        }
        status
    }

    /// Folds the log with its definition: the state, and for each record the
    /// commands its transition produced (what must have been sent after it).
    pub fn fold<D: DeserializeOwned + Clone>(
        &self,
        def: &Definition<D>,
    ) -> Result<(SagaState<D>, Vec<Vec<Command>>), SagaError> {
        let data: D = serde_json::from_value(self.data.clone()).map_err(|e| SagaError::Decode {
            what: "saga data",
            reason: e.to_string(),
        })?;
        let mut state = SagaState::new(self.id.clone(), data);
        let mut commands = Vec::with_capacity(self.records.len());
        for r in &self.records {
            let (next, cmds) = react(def, &state, &r.event);
            state = next;
            commands.push(cmds);
        }
        Ok((state, commands))
    }

    /// The state right after the transition at `position` and the commands
    /// that transition produced; `None` if no transition is there.
    pub fn fold_to<D: DeserializeOwned + Clone>(
        &self,
        def: &Definition<D>,
        position: u64,
    ) -> Result<Option<Reaction<D>>, SagaError> {
        let Some(index) = self.records.iter().position(|r| r.position == position) else {
            return Ok(None);
        };
        let data: D = serde_json::from_value(self.data.clone()).map_err(|e| SagaError::Decode {
            what: "saga data",
            reason: e.to_string(),
        })?;
        let mut state = SagaState::new(self.id.clone(), data);
        let mut commands = Vec::new();
        for r in &self.records[..=index] {
            (state, commands) = react(def, &state, &r.event);
        }
        Ok(Some((state, commands)))
    }
}

/// Appends `event` if the log still stands at `after` (the caller knows
/// the log at that version, so it checked its guard without reading).
/// `Ok(None)`: the log moved on; check the guard against a fresh read
/// ([`append_guarded`]).
pub(crate) async fn append_at(
    store: &EventStore,
    name: &str,
    saga_id: &str,
    after: u64,
    event: &SagaEvent,
    event_id: &str,
) -> Result<Option<sluice_events::AppendResult>, SagaError> {
    let stream = saga_stream(name, saga_id)?;
    let new = encode(event, event_id, saga_id, after)?;
    match store
        .append(&stream, ExpectedVersion::Exact(after), vec![new])
        .await
    {
        Ok(r) => Ok(Some(r)),
        // The id is in the log already (with other data, e.g. another
        // `after`): the log moved, as with a conflict.
        Err(e) if e.is_conflict() || e.is_id_reused() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A saga's state after a transition and the commands the transition sent.
pub type Reaction<D> = (SagaState<D>, Vec<Command>);

/// Reads instance `id` of saga `name`.
pub async fn read_log(store: &EventStore, name: &str, id: &str) -> Result<SagaLog, SagaError> {
    let stream = saga_stream(name, id)?;
    let mut history = store.history_direct(&stream).await?;
    if history.version == 0 {
        // A replica answering the direct get may not have the instance yet
        // (an R3 follower right after the start): the leader says whether
        // it exists, so a read right after a 202 never answers "no such
        // saga". Only unknown ids pay for that consumer.
        history = store.history(&stream).await?;
    }
    let mut log = SagaLog {
        name: name.to_owned(),
        id: id.to_owned(),
        data: Value::Null,
        records: Vec::new(),
        version: history.version,
    };
    for recorded in history.events {
        let (record, data) = decode_record(&recorded.envelope, recorded.position)?;
        if let Some(data) = data {
            log.data = data;
        }
        log.records.push(record);
    }
    Ok(log)
}

/// Encodes a transition appended with `Exact(after)`. The data carries
/// `after`, so a reader that folded the log up to `after` (the orchestrator's
/// cache) knows this event is the very next one and need not read the log.
pub(crate) fn encode(
    event: &SagaEvent,
    id: &str,
    saga_id: &str,
    after: u64,
) -> Result<NewEvent, SagaError> {
    let bad = |e: serde_json::Error| SagaError::Decode {
        what: "saga event",
        reason: e.to_string(),
    };
    let mut body = serde_json::to_value(event).map_err(bad)?;
    if let Value::Object(map) = &mut body {
        map.insert(AFTER.to_owned(), Value::from(after));
    }
    let data = serde_json::to_vec(&body).map_err(bad)?;
    Ok(NewEvent::new(event_type(event), data)
        .with_id(EventId::parse(id)?)
        .with_source("urn:sluice:saga")
        .with_correlation_id(saga_id))
}

/// What the start of an instance did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    /// Position of the `Started` event (pass it as `min_position`).
    pub position: u64,
    /// False when the instance already existed (a repeated start).
    pub created: bool,
}

/// Starts instance `id` of `def` with `data`: appends `Started` to a new
/// stream. Starting an existing id again is a no-op reporting the first
/// start, so a client may retry with the same id.
pub async fn start<D: Serialize>(
    store: &EventStore,
    def: &Definition<D>,
    id: &str,
    data: &D,
) -> Result<Started, SagaError> {
    if id.len() > 64 {
        // Command ids embed the saga id and must stay within 128 characters.
        return Err(SagaError::Invalid(format!(
            "saga id {:?}... is longer than 64 characters",
            id.chars().take(16).collect::<String>()
        )));
    }
    let stream = saga_stream(def.name(), id)?;
    let body = serde_json::to_vec(&serde_json::json!({ "data": data })).map_err(|e| {
        SagaError::Decode {
            what: "saga data",
            reason: e.to_string(),
        }
    })?;
    let event = NewEvent::new(STARTED, body)
        .with_id(EventId::parse(&format!("{id}/started"))?)
        .with_source("urn:sluice:saga")
        .with_correlation_id(id);
    match store
        .append(&stream, ExpectedVersion::NoStream, vec![event])
        .await
    {
        Ok(r) => Ok(Started {
            position: r.positions.first().copied().unwrap_or(r.version),
            created: !r.deduplicated,
        }),
        // Started before (with other data when the id is reused): the
        // first start stands.
        Err(e) if e.is_conflict() || e.is_id_reused() => {
            let log = read_log(store, def.name(), id).await?;
            Ok(Started {
                position: log.records.first().map_or(log.version, |r| r.position),
                created: false,
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// What [`append_guarded`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guarded {
    /// The event was appended at this position.
    Appended(u64),
    /// The guard said no (with why); nothing was appended.
    Refused(&'static str),
}

/// Appends the event `decide` returns for the current log, with optimistic
/// concurrency on the log's version; on a conflict it reloads and asks
/// `decide` again. This is how every party writes to a saga: the guard runs
/// against exactly the log the append extends.
pub async fn append_guarded(
    store: &EventStore,
    name: &str,
    saga_id: &str,
    mut decide: impl FnMut(&SagaLog) -> Result<(SagaEvent, String), &'static str>,
) -> Result<Guarded, SagaError> {
    let stream = saga_stream(name, saga_id)?;
    for _ in 0..MAX_RACES {
        let log = read_log(store, name, saga_id).await?;
        if log.version == 0 {
            return Ok(Guarded::Refused("unknown saga instance"));
        }
        let (event, event_id) = match decide(&log) {
            Ok(x) => x,
            Err(why) => return Ok(Guarded::Refused(why)),
        };
        let new = encode(&event, &event_id, saga_id, log.version)?;
        match store
            .append(&stream, ExpectedVersion::Exact(log.version), vec![new])
            .await
        {
            Ok(r) => return Ok(Guarded::Appended(r.version)),
            // An event with this id is in the log already: reload, and let
            // the guard decide on what is there.
            Err(e) if e.is_conflict() || e.is_id_reused() => {
                tracing::debug!(
                    saga = name,
                    saga_id,
                    "lost a race on the saga log; reloading"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(SagaError::Invalid(format!(
        "saga {name}/{saga_id}: still conflicting after {MAX_RACES} reloads"
    )))
}

/// What an operator asks of a saga instance that needs attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorAction {
    /// Send the command it is stuck on again, as the next attempt: the
    /// failed step's action, or the failed compensation. The effect key
    /// (`<saga-id>/<step>[/undo]`, no attempt) makes it take effect at most
    /// once in all, whatever earlier attempts did.
    Retry,
    /// State the outcome; nothing is sent.
    Resolve(Outcome),
    /// Stop without acting; nothing is sent.
    Abandon,
}

impl OperatorAction {
    /// `retry`, `resolve` or `abandon`.
    pub fn name(self) -> &'static str {
        match self {
            OperatorAction::Retry => "retry",
            OperatorAction::Resolve(_) => "resolve",
            OperatorAction::Abandon => "abandon",
        }
    }
}

/// Applies an operator's `action` with `note` to instance `id` of `def`:
/// appends the transition (retried, resolved, abandoned) to the saga's log
/// before anything acts on it (the orchestrator sends a retry's command
/// once the transition is stored). Only a saga in `needs_attention` accepts
/// one; anything else is [`SagaError::WrongState`] naming the state, an
/// unknown id [`SagaError::UnknownInstance`]. Guarded by the log's version,
/// so a double click acts once and the second is refused. Returns the
/// position of the transition.
pub async fn operate<D: DeserializeOwned + Clone>(
    store: &EventStore,
    def: &Definition<D>,
    id: &str,
    action: OperatorAction,
    note: &str,
) -> Result<u64, SagaError> {
    let note = note.trim();
    if note.is_empty() {
        return Err(SagaError::Invalid(format!(
            "{} needs a note (who and why), kept in the saga's log",
            action.name()
        )));
    }
    for _ in 0..MAX_RACES {
        let log = read_log(store, def.name(), id).await?;
        if log.version == 0 {
            return Err(SagaError::UnknownInstance {
                saga: def.name(),
                id: id.to_owned(),
            });
        }
        let (state, _) = log.fold(def)?;
        if !matches!(state.status, crate::model::Status::NeedsAttention { .. }) {
            return Err(SagaError::WrongState {
                saga: def.name(),
                id: id.to_owned(),
                action: action.name(),
                state: crate::history::describe_status(def, &state.status),
            });
        }
        let event = match action {
            OperatorAction::Retry => SagaEvent::Retried {
                note: note.to_owned(),
            },
            OperatorAction::Resolve(outcome) => SagaEvent::Resolved {
                outcome,
                note: note.to_owned(),
            },
            OperatorAction::Abandon => SagaEvent::Abandoned {
                note: note.to_owned(),
            },
        };
        let event_id = format!("{id}/{}/{}", action.name(), log.version);
        if let Some(r) = append_at(store, def.name(), id, log.version, &event, &event_id).await? {
            return Ok(r.version);
        }
        tracing::debug!(
            saga = def.name(),
            saga_id = id,
            "lost a race on the saga log; reloading"
        );
    }
    Err(SagaError::Invalid(format!(
        "saga {}/{id}: still conflicting after {MAX_RACES} reloads",
        def.name()
    )))
}

/// Ids of every instance of saga `name`, sorted (for `sluice saga list`).
/// Asks the server for the subjects of `events.saga-<name>.>`: one request,
/// paged by the server; filter by status with [`SagaLog::fold`].
pub async fn list_instances(store: &EventStore, name: &str) -> Result<Vec<String>, SagaError> {
    use futures::TryStreamExt;

    let nats = |e: &dyn std::fmt::Display| SagaError::Nats {
        doing: "listing saga instances",
        reason: e.to_string(),
    };
    let config = store.config();
    let prefix = format!("{}.{SAGA_CATEGORY_PREFIX}{name}.", config.subject_prefix);
    let stream = store
        .stream_handle(&config.stream)
        .await
        .map_err(|e| nats(&e))?;
    let subjects: Vec<(String, usize)> = stream
        .info_with_subjects(format!("{prefix}>"))
        .await
        .map_err(|e| nats(&e))?
        .try_collect()
        .await
        .map_err(|e| nats(&e))?;
    let mut ids: Vec<String> = subjects
        .into_iter()
        .filter_map(|(s, _)| s.strip_prefix(&prefix).map(str::to_owned))
        .collect();
    ids.sort();
    Ok(ids)
}
