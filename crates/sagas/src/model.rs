//! The pure saga model: definitions, state, events, and `react`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Builds a command's payload from the saga's data.
type PayloadFn<D> = fn(&D) -> Value;
/// Folds a step's reply into the saga's data.
type ReplyFn<D> = fn(&mut D, &Value);

/// One step: an action, its optional compensation, reply handling, deadline.
struct Step<D> {
    name: &'static str,
    target: PayloadTarget<D>,
    compensation: Option<PayloadTarget<D>>,
    on_reply: Option<ReplyFn<D>>,
    deadline: Duration,
}

struct PayloadTarget<D> {
    command: &'static str,
    payload: PayloadFn<D>,
}

/// A saga's steps, in order. Build with [`Definition::new`] and
/// [`StepBuilder`].
pub struct Definition<D> {
    name: &'static str,
    steps: Vec<Step<D>>,
    default_deadline: Duration,
    saga_deadline: Duration,
}

/// Default of [`Definition::saga_deadline`]: long enough for every step's own
/// deadline (30 s by default) and a refund, short enough that a stuck
/// instance asks for help within minutes.
pub const DEFAULT_SAGA_DEADLINE: Duration = Duration::from_secs(5 * 60);

impl<D> std::fmt::Debug for Definition<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Definition")
            .field("name", &self.name)
            .field(
                "steps",
                &self.steps.iter().map(|s| s.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Why a definition is unusable, or the durable runtime failed (the one
/// error type of this crate).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    /// No steps.
    #[error("saga {0} has no steps")]
    Empty(&'static str),
    /// Two steps share a name (command ids would collide).
    #[error("saga {saga} has two steps named {step}")]
    DuplicateStep {
        /// The saga.
        saga: &'static str,
        /// The repeated name.
        step: &'static str,
    },
    /// The event store failed (including a conflict that outlasted retries).
    #[error(transparent)]
    Events(#[from] sluice_events::Error),
    /// The worker runtime failed.
    #[error(transparent)]
    Workers(#[from] sluice_workers::Error),
    /// A NATS request outside the event store failed (timers).
    #[error("NATS request failed while {doing}: {reason}")]
    Nats {
        /// What the runtime was doing.
        doing: &'static str,
        /// The client's error.
        reason: String,
    },
    /// A stored saga event or command cannot be read back.
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// What was decoded.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// A saga id, step or command target is not usable.
    #[error("invalid saga input: {0}")]
    Invalid(String),
    /// An operator action named an instance that does not exist.
    #[error("no {saga} saga {id}: check the id against the list of its instances")]
    UnknownInstance {
        /// The saga.
        saga: &'static str,
        /// The id asked for.
        id: String,
    },
    /// An operator action does not apply in the instance's current state
    /// (every operator action needs `needs_attention`).
    #[error("{saga} {id} is {state}: {action} acts only on a saga that needs attention")]
    WrongState {
        /// The saga.
        saga: &'static str,
        /// The instance.
        id: String,
        /// `retry`, `resolve` or `abandon`.
        action: &'static str,
        /// The current state in words (`completed`, `running credit`, ...).
        state: String,
    },
}

impl SagaError {
    /// True for an operator action on an unknown instance (CLI exit 1, HTTP 404).
    pub fn is_unknown_instance(&self) -> bool {
        matches!(self, SagaError::UnknownInstance { .. })
    }

    /// True for an operator action refused in the current state (CLI exit 1,
    /// HTTP 409).
    pub fn is_wrong_state(&self) -> bool {
        matches!(self, SagaError::WrongState { .. })
    }
}

impl<D> Definition<D> {
    /// A saga named `name` (its streams are `events.saga-<name>.<id>`).
    ///
    /// A definition is plain data: steps, each with the command that does
    /// it and the one that undoes it, checked by [`Definition::build`].
    ///
    /// ```
    /// use serde_json::json;
    /// use sluice_sagas::Definition;
    ///
    /// struct Order {
    ///     sku: String,
    ///     quantity: u32,
    /// }
    ///
    /// let saga = Definition::<Order>::new("order")
    ///     .step("reserve")
    ///     .with_compensation("shop.stock.release", |o| json!({"sku": o.sku, "quantity": o.quantity}))
    ///     .invoke("shop.stock.reserve", |o| json!({"sku": o.sku, "quantity": o.quantity}))
    ///     .step("sell")
    ///     .invoke("shop.stock.sell", |o| json!({"sku": o.sku, "quantity": o.quantity}))
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(saga.step_names(), ["reserve", "sell"]);
    ///
    /// // A saga without steps, or with two steps of one name, is refused.
    /// assert!(Definition::<Order>::new("empty").build().is_err());
    /// ```
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            steps: Vec::new(),
            default_deadline: Duration::from_secs(30),
            saga_deadline: DEFAULT_SAGA_DEADLINE,
        }
    }

    /// The overall deadline of an instance, counted from its start (and
    /// again from each operator retry): when it passes, the instance is
    /// compensated if that is safe, else it needs attention (see
    /// [`SagaEvent::DeadlinePassed`]). Default [`DEFAULT_SAGA_DEADLINE`].
    pub fn saga_deadline(mut self, d: Duration) -> Self {
        self.saga_deadline = d;
        self
    }

    /// The overall deadline of an instance.
    pub fn overall_deadline(&self) -> Duration {
        self.saga_deadline
    }

    /// Starts describing the next step.
    pub fn step(self, name: &'static str) -> StepBuilder<D> {
        StepBuilder {
            definition: self,
            name,
            compensation: None,
            on_reply: None,
            deadline: None,
        }
    }

    /// Checks the definition (non-empty, unique step names).
    pub fn build(self) -> Result<Self, SagaError> {
        if self.steps.is_empty() {
            return Err(SagaError::Empty(self.name));
        }
        if self.saga_deadline.is_zero() {
            return Err(SagaError::Invalid(format!(
                "saga {}: the overall deadline must be longer than zero",
                self.name
            )));
        }
        for (i, s) in self.steps.iter().enumerate() {
            if self.steps[..i].iter().any(|p| p.name == s.name) {
                return Err(SagaError::DuplicateStep {
                    saga: self.name,
                    step: s.name,
                });
            }
        }
        Ok(self)
    }

    /// The saga's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The deadline of step `step` (None past the last step).
    pub fn step_deadline(&self, step: usize) -> Option<Duration> {
        self.steps.get(step).map(|s| s.deadline)
    }

    /// Step names in order.
    pub fn step_names(&self) -> Vec<&'static str> {
        self.steps.iter().map(|s| s.name).collect()
    }
}

/// Describes one step; finish it with [`StepBuilder::invoke`].
pub struct StepBuilder<D> {
    definition: Definition<D>,
    name: &'static str,
    compensation: Option<PayloadTarget<D>>,
    on_reply: Option<ReplyFn<D>>,
    deadline: Option<Duration>,
}

impl<D> StepBuilder<D> {
    /// How to undo this step once it succeeded and a later one fails.
    pub fn with_compensation(mut self, command: &'static str, payload: PayloadFn<D>) -> Self {
        self.compensation = Some(PayloadTarget { command, payload });
        self
    }

    /// Folds the step's success reply into the saga's data.
    pub fn on_reply(mut self, f: ReplyFn<D>) -> Self {
        self.on_reply = Some(f);
        self
    }

    /// How long the step may take before it counts as failed.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    /// The step's action; returns the definition for the next step.
    pub fn invoke(mut self, command: &'static str, payload: PayloadFn<D>) -> Definition<D> {
        let deadline = self.deadline.unwrap_or(self.definition.default_deadline);
        self.definition.steps.push(Step {
            name: self.name,
            target: PayloadTarget { command, payload },
            compensation: self.compensation,
            on_reply: self.on_reply,
            deadline,
        });
        self.definition
    }
}

/// Where a saga instance stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    /// Created, not started.
    New,
    /// Waiting for step `step`'s action.
    Running {
        /// Index of the current step.
        step: usize,
    },
    /// Undoing: waiting for step `step`'s compensation.
    Compensating {
        /// Index of the step being compensated.
        step: usize,
        /// Why the saga is compensating.
        reason: String,
    },
    /// Every step succeeded.
    Completed,
    /// A step failed and every completed step was undone.
    Compensated {
        /// Why.
        reason: String,
    },
    /// Stuck: a compensation failed permanently, a command was
    /// dead-lettered, or the overall deadline passed while the outcome of a
    /// command was unknown. Nothing happens until an operator retries,
    /// resolves or abandons it, except that a late reply to exactly the
    /// command it is stuck on (`retry`, `step`, the state's attempt) still
    /// counts, since it tells the outcome.
    NeedsAttention {
        /// Index of the step it is stuck on.
        #[serde(default)]
        step: usize,
        /// Why.
        reason: String,
        /// What a retry sends again: the step's action or its compensation.
        #[serde(default = "compensation_kind")]
        retry: CommandKind,
    },
    /// An operator stated the outcome of a saga that needed attention.
    Resolved {
        /// The outcome the operator stated.
        outcome: Outcome,
        /// The operator's note.
        note: String,
    },
    /// An operator stopped a saga that needed attention without acting
    /// (after fixing things by hand).
    Abandoned {
        /// The operator's note.
        note: String,
        /// Why it needed attention.
        reason: String,
    },
}

fn compensation_kind() -> CommandKind {
    CommandKind::Compensation
}

/// The outcome an operator states with [`SagaEvent::Resolved`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every step took effect.
    Completed,
    /// Nothing is left in effect (every completed step was undone).
    Compensated,
}

impl Outcome {
    /// `completed` or `compensated`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Compensated => "compensated",
        }
    }
}

/// How an operator states a saga's outcome (`resolve`):
///
/// ```
/// use sluice_sagas::Outcome;
///
/// let o: Outcome = "compensated".parse().unwrap();
/// assert_eq!(o.as_str(), "compensated");
/// assert!("maybe".parse::<Outcome>().is_err());
/// ```
impl std::str::FromStr for Outcome {
    type Err = SagaError;

    fn from_str(s: &str) -> Result<Self, SagaError> {
        match s {
            "completed" => Ok(Outcome::Completed),
            "compensated" => Ok(Outcome::Compensated),
            other => Err(SagaError::Invalid(format!(
                "outcome {other:?} is not one of: completed, compensated"
            ))),
        }
    }
}

impl Status {
    /// True when nothing more will happen without an operator.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Status::Completed
                | Status::Compensated { .. }
                | Status::NeedsAttention { .. }
                | Status::Resolved { .. }
                | Status::Abandoned { .. }
        )
    }
}

/// A saga instance's state, folded from its events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaState<D> {
    /// The instance id.
    pub id: String,
    /// The flow's data.
    pub data: D,
    /// Where it stands.
    pub status: Status,
    /// Attempt number of the command in flight (1-based).
    pub attempt: u32,
}

impl<D> SagaState<D> {
    /// A new instance with its data.
    pub fn new(id: impl Into<String>, data: D) -> Self {
        Self {
            id: id.into(),
            data,
            status: Status::New,
            attempt: 0,
        }
    }
}

/// What happened to a saga instance (stored, in order, on its stream).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SagaEvent {
    /// Start the flow.
    Started,
    /// The action of `step` succeeded.
    StepSucceeded {
        /// Step index.
        step: usize,
        /// Attempt the reply answers.
        attempt: u32,
        /// The reply body.
        reply: Value,
    },
    /// The action of `step` failed permanently.
    StepFailed {
        /// Step index.
        step: usize,
        /// Attempt the reply answers.
        attempt: u32,
        /// Why.
        reason: String,
    },
    /// The deadline of `step`'s attempt passed.
    StepTimedOut {
        /// Step index.
        step: usize,
        /// Attempt that timed out.
        attempt: u32,
    },
    /// A command handler took `step`'s action (attempt `attempt`) and is
    /// about to apply it: from now on the step's deadline can no longer
    /// cancel it; only the handler's reply decides. `react` ignores it; the
    /// runtime appends it (with optimistic concurrency) only while neither a
    /// reply nor a timeout is recorded, and a timeout only while no claim is.
    StepClaimed {
        /// Step index.
        step: usize,
        /// Attempt claimed.
        attempt: u32,
    },
    /// An operator asks a saga in `needs_attention` to send the command it
    /// is stuck on again (after fixing its cause): the next attempt of the
    /// step's action or compensation goes out.
    Retried {
        /// Who asked, or why (for the audit trail).
        note: String,
    },
    /// An operator states the outcome of a saga in `needs_attention`; nothing
    /// is sent.
    Resolved {
        /// The stated outcome.
        outcome: Outcome,
        /// Who, and why (for the audit trail).
        note: String,
    },
    /// An operator stops a saga in `needs_attention` without acting.
    Abandoned {
        /// Who, and why (for the audit trail).
        note: String,
    },
    /// The worker runtime dead-lettered command `command` (the orchestrator
    /// read it from the `DLQ` stream). Written only while the command is
    /// the one the saga waits for; from then on no handler may claim or
    /// answer it (a redrive of it changes nothing), and the saga needs
    /// attention.
    CommandDeadLettered {
        /// Action or compensation.
        kind: CommandKind,
        /// Step index.
        step: usize,
        /// Attempt.
        attempt: u32,
        /// The command id.
        command: String,
        /// The consumer that gave up on it.
        consumer: String,
        /// The dead letter's id (its sequence in `DLQ`).
        dead_letter: u64,
        /// The dead letter's reason.
        reason: String,
    },
    /// The instance's overall deadline passed while it waited for `kind`
    /// `(step, attempt)`. An unclaimed action is closed by it (like a step
    /// timeout: no handler may claim it afterwards) and the saga
    /// compensates; a claimed action (`claimed`: its outcome is unknown) or a
    /// compensation in flight makes the saga need attention.
    DeadlinePassed {
        /// Position of the transition that armed the deadline (`Started` or
        /// an operator's `Retried`).
        armed: u64,
        /// Action or compensation in flight.
        kind: CommandKind,
        /// Step index.
        step: usize,
        /// Attempt.
        attempt: u32,
        /// A handler had claimed the action.
        claimed: bool,
        /// The deadline, in milliseconds.
        deadline_ms: u64,
    },
    /// The compensation of `step` succeeded.
    CompensationSucceeded {
        /// Step index.
        step: usize,
        /// Attempt the reply answers.
        attempt: u32,
    },
    /// The compensation of `step` failed.
    CompensationFailed {
        /// Step index.
        step: usize,
        /// Attempt the reply answers.
        attempt: u32,
        /// Why.
        reason: String,
        /// Retrying cannot help.
        permanent: bool,
    },
}

/// Whether a command does or undoes a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// The step's action.
    Action,
    /// The step's compensation.
    Compensation,
}

/// A command the runtime must send after persisting the transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Deterministic id `<saga-id>/<step>/<attempt>` (compensations add
    /// `/undo`): the receiver dedups resends on it.
    pub id: String,
    /// Action or compensation.
    pub kind: CommandKind,
    /// Step index.
    pub step: usize,
    /// Step name.
    pub step_name: String,
    /// Attempt number.
    pub attempt: u32,
    /// Command name, e.g. `ledger.account.withdraw`.
    pub command: String,
    /// Command payload.
    pub payload: Value,
    /// When the reply is due (actions only; compensations retry until done).
    #[serde(with = "duration_ms", default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Duration>,
}

impl Command {
    /// The idempotency key of the command's effect on its target: the id
    /// without the attempt (`<saga-id>/<step>` or `<saga-id>/<step>/undo`).
    /// A retried compensation (attempt 2, 3, ...) must not apply twice when
    /// an earlier attempt's write landed but its reply was lost, so handlers
    /// look for this key, not the attempt's id.
    pub fn effect_key(&self, saga_id: &str) -> String {
        match self.kind {
            CommandKind::Action => format!("{saga_id}/{}", self.step_name),
            CommandKind::Compensation => format!("{saga_id}/{}/undo", self.step_name),
        }
    }
}

mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(d.as_millis() as u64),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

fn action<D>(def: &Definition<D>, state: &SagaState<D>, step: usize, attempt: u32) -> Command {
    let s = &def.steps[step];
    Command {
        id: format!("{}/{}/{}", state.id, s.name, attempt),
        kind: CommandKind::Action,
        step,
        step_name: s.name.to_owned(),
        attempt,
        command: s.target.command.to_owned(),
        payload: (s.target.payload)(&state.data),
        deadline: Some(s.deadline),
    }
}

/// The compensation command of `step`, if it has one.
fn compensation<D>(
    def: &Definition<D>,
    state: &SagaState<D>,
    step: usize,
    attempt: u32,
) -> Option<Command> {
    let s = &def.steps[step];
    let c = s.compensation.as_ref()?;
    Some(Command {
        id: format!("{}/{}/{}/undo", state.id, s.name, attempt),
        kind: CommandKind::Compensation,
        step,
        step_name: s.name.to_owned(),
        attempt,
        command: c.command.to_owned(),
        payload: (c.payload)(&state.data),
        deadline: None,
    })
}

/// Walks back from `from` (exclusive) to the nearest completed step with a
/// compensation; none left means the saga is compensated.
fn compensate_from<D: Clone>(
    def: &Definition<D>,
    mut state: SagaState<D>,
    from: usize,
    reason: String,
) -> (SagaState<D>, Vec<Command>) {
    for step in (0..from).rev() {
        if let Some(cmd) = compensation(def, &state, step, 1) {
            state.status = Status::Compensating { step, reason };
            state.attempt = 1;
            return (state, vec![cmd]);
        }
    }
    state.status = Status::Compensated { reason };
    state.attempt = 0;
    (state, vec![])
}

/// The saga's reaction to one event: its next state and the commands to send
/// (after the new state is persisted). Events that do not fit the current
/// state (late replies, stale timeouts) change nothing.
pub fn react<D: Clone>(
    def: &Definition<D>,
    state: &SagaState<D>,
    event: &SagaEvent,
) -> (SagaState<D>, Vec<Command>) {
    let unchanged = || (state.clone(), vec![]);
    // A saga stuck on a command still takes that command's reply: it tells
    // the outcome the saga was waiting for.
    let current = |step: usize, attempt: u32| {
        state.attempt == attempt
            && match state.status {
                Status::Running { step: s } => s == step,
                Status::NeedsAttention {
                    step: s,
                    retry: CommandKind::Action,
                    ..
                } => s == step,
                _ => false,
            }
    };
    let undoing = |step: usize, attempt: u32| {
        state.attempt == attempt
            && match state.status {
                Status::Compensating { step: s, .. } => s == step,
                Status::NeedsAttention {
                    step: s,
                    retry: CommandKind::Compensation,
                    ..
                } => s == step,
                _ => false,
            }
    };
    // The reason a compensation runs for (kept across a stuck spell).
    let compensating_reason = || match &state.status {
        Status::Compensating { reason, .. } | Status::NeedsAttention { reason, .. } => {
            reason.clone()
        }
        _ => String::new(),
    };
    match event {
        SagaEvent::Started if state.status == Status::New => {
            let mut next = state.clone();
            next.status = Status::Running { step: 0 };
            next.attempt = 1;
            let cmd = action(def, &next, 0, 1);
            (next, vec![cmd])
        }
        SagaEvent::StepSucceeded {
            step,
            attempt,
            reply,
        } if current(*step, *attempt) => {
            let mut next = state.clone();
            if let Some(f) = def.steps[*step].on_reply {
                f(&mut next.data, reply);
            }
            let following = step + 1;
            if following == def.steps.len() {
                next.status = Status::Completed;
                next.attempt = 0;
                (next, vec![])
            } else {
                next.status = Status::Running { step: following };
                next.attempt = 1;
                let cmd = action(def, &next, following, 1);
                (next, vec![cmd])
            }
        }
        SagaEvent::StepFailed {
            step,
            attempt,
            reason,
        } if current(*step, *attempt) => compensate_from(
            def,
            state.clone(),
            *step,
            format!("step {} failed: {reason}", def.steps[*step].name),
        ),
        SagaEvent::StepTimedOut { step, attempt } if current(*step, *attempt) => compensate_from(
            def,
            state.clone(),
            *step,
            format!(
                "step {} timed out after {:?}",
                def.steps[*step].name, def.steps[*step].deadline
            ),
        ),
        SagaEvent::CompensationSucceeded { step, attempt } if undoing(*step, *attempt) => {
            compensate_from(def, state.clone(), *step, compensating_reason())
        }
        SagaEvent::CompensationFailed {
            step,
            attempt,
            reason,
            permanent,
        } if undoing(*step, *attempt) => {
            let mut next = state.clone();
            if *permanent {
                next.status = Status::NeedsAttention {
                    step: *step,
                    reason: format!(
                        "compensation of step {} failed permanently: {reason}",
                        def.steps[*step].name
                    ),
                    retry: CommandKind::Compensation,
                };
                (next, vec![])
            } else {
                next.status = Status::Compensating {
                    step: *step,
                    reason: compensating_reason(),
                };
                next.attempt = attempt + 1;
                let cmds = compensation(def, &next, *step, next.attempt)
                    .into_iter()
                    .collect();
                (next, cmds)
            }
        }
        SagaEvent::Retried { .. } => match &state.status {
            Status::NeedsAttention {
                step,
                reason,
                retry: CommandKind::Compensation,
            } => {
                let mut next = state.clone();
                next.status = Status::Compensating {
                    step: *step,
                    reason: reason.clone(),
                };
                next.attempt = state.attempt + 1;
                let cmds = compensation(def, &next, *step, next.attempt)
                    .into_iter()
                    .collect();
                (next, cmds)
            }
            Status::NeedsAttention {
                step,
                retry: CommandKind::Action,
                ..
            } => {
                let mut next = state.clone();
                next.status = Status::Running { step: *step };
                next.attempt = state.attempt + 1;
                let cmd = action(def, &next, *step, next.attempt);
                (next, vec![cmd])
            }
            _ => unchanged(),
        },
        SagaEvent::Resolved { outcome, note } => match &state.status {
            Status::NeedsAttention { .. } => {
                let mut next = state.clone();
                next.status = Status::Resolved {
                    outcome: *outcome,
                    note: note.clone(),
                };
                next.attempt = 0;
                (next, vec![])
            }
            _ => unchanged(),
        },
        SagaEvent::Abandoned { note } => match &state.status {
            Status::NeedsAttention { reason, .. } => {
                let mut next = state.clone();
                next.status = Status::Abandoned {
                    note: note.clone(),
                    reason: reason.clone(),
                };
                next.attempt = 0;
                (next, vec![])
            }
            _ => unchanged(),
        },
        SagaEvent::CommandDeadLettered {
            kind,
            step,
            attempt,
            command,
            consumer,
            dead_letter,
            reason,
        } if match kind {
            CommandKind::Action => current(*step, *attempt),
            CommandKind::Compensation => undoing(*step, *attempt),
        } =>
        {
            let mut next = state.clone();
            next.status = Status::NeedsAttention {
                step: *step,
                reason: format!(
                    "command {command} was dead-lettered by {consumer} (dead letter {dead_letter}): {reason}"
                ),
                retry: *kind,
            };
            (next, vec![])
        }
        SagaEvent::DeadlinePassed {
            kind,
            step,
            attempt,
            claimed,
            deadline_ms,
            ..
        } => {
            let after = Duration::from_millis(*deadline_ms);
            let name = def.steps.get(*step).map_or("?", |s| s.name);
            match kind {
                CommandKind::Action if current(*step, *attempt) && !claimed => compensate_from(
                    def,
                    state.clone(),
                    *step,
                    format!("saga deadline of {after:?} passed during step {name}"),
                ),
                CommandKind::Action if current(*step, *attempt) => {
                    let mut next = state.clone();
                    next.status = Status::NeedsAttention {
                        step: *step,
                        reason: format!(
                            "saga deadline of {after:?} passed while step {name} was claimed by its handler and unanswered: whether it took effect is unknown"
                        ),
                        retry: CommandKind::Action,
                    };
                    (next, vec![])
                }
                CommandKind::Compensation if undoing(*step, *attempt) => {
                    let mut next = state.clone();
                    next.status = Status::NeedsAttention {
                        step: *step,
                        reason: format!(
                            "saga deadline of {after:?} passed while compensating step {name} (the compensation is unconfirmed): {}",
                            compensating_reason()
                        ),
                        retry: CommandKind::Compensation,
                    };
                    (next, vec![])
                }
                _ => unchanged(),
            }
        }
        _ => unchanged(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Clone, PartialEq)]
    struct Transfer {
        from: String,
        to: String,
        amount: u64,
        reservation: Option<String>,
    }

    fn transfer() -> Definition<Transfer> {
        Definition::<Transfer>::new("transfer")
            .step("reserve")
            .with_compensation(
                "ledger.account.release",
                |t| json!({"account": t.from, "amount": t.amount}),
            )
            .on_reply(|t, r| t.reservation = r["reservation"].as_str().map(str::to_owned))
            .deadline(Duration::from_secs(5))
            .invoke(
                "ledger.account.reserve",
                |t| json!({"account": t.from, "amount": t.amount}),
            )
            .step("deposit")
            .invoke(
                "ledger.account.deposit",
                |t| json!({"account": t.to, "amount": t.amount}),
            )
            .step("complete")
            .invoke(
                "ledger.account.settle",
                |t| json!({"reservation": t.reservation}),
            )
            .build()
            .unwrap()
    }

    fn start() -> SagaState<Transfer> {
        SagaState::new(
            "t-1",
            Transfer {
                from: "a".into(),
                to: "b".into(),
                amount: 10,
                reservation: None,
            },
        )
    }

    /// Given events, fold them; return the final state and all commands.
    fn given(
        def: &Definition<Transfer>,
        events: &[SagaEvent],
    ) -> (SagaState<Transfer>, Vec<Command>) {
        let mut state = start();
        let mut all = vec![];
        for e in events {
            let (s, cmds) = react(def, &state, e);
            state = s;
            all.extend(cmds);
        }
        (state, all)
    }

    fn ok(step: usize, reply: Value) -> SagaEvent {
        SagaEvent::StepSucceeded {
            step,
            attempt: 1,
            reply,
        }
    }

    #[test]
    fn happy_path_runs_each_step_once_with_deterministic_ids() {
        let def = transfer();
        let (state, cmds) = given(
            &def,
            &[
                SagaEvent::Started,
                ok(0, json!({"reservation": "r-9"})),
                ok(1, json!({})),
                ok(2, json!({})),
            ],
        );
        assert_eq!(state.status, Status::Completed);
        let ids: Vec<&str> = cmds.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["t-1/reserve/1", "t-1/deposit/1", "t-1/complete/1"]);
        assert_eq!(cmds[2].payload, json!({"reservation": "r-9"}));
        assert_eq!(cmds[0].deadline, Some(Duration::from_secs(5)));
    }

    #[test]
    fn a_failed_step_compensates_completed_steps_in_reverse() {
        let def = transfer();
        let (state, cmds) = given(
            &def,
            &[
                SagaEvent::Started,
                ok(0, json!({})),
                SagaEvent::StepFailed {
                    step: 1,
                    attempt: 1,
                    reason: "account b is closed".into(),
                },
            ],
        );
        assert!(matches!(state.status, Status::Compensating { step: 0, .. }));
        let last = cmds.last().unwrap();
        assert_eq!(last.kind, CommandKind::Compensation);
        assert_eq!(last.command, "ledger.account.release");
        assert_eq!(last.id, "t-1/reserve/1/undo");
        let (state, cmds) = react(
            &def,
            &state,
            &SagaEvent::CompensationSucceeded {
                step: 0,
                attempt: 1,
            },
        );
        assert!(cmds.is_empty());
        assert_eq!(
            state.status,
            Status::Compensated {
                reason: "step deposit failed: account b is closed".into()
            }
        );
    }

    #[test]
    fn the_first_step_failing_needs_no_compensation() {
        let def = transfer();
        let (state, cmds) = given(
            &def,
            &[
                SagaEvent::Started,
                SagaEvent::StepFailed {
                    step: 0,
                    attempt: 1,
                    reason: "insufficient funds".into(),
                },
            ],
        );
        assert_eq!(cmds.len(), 1);
        assert!(matches!(state.status, Status::Compensated { .. }));
    }

    #[test]
    fn transient_compensation_failures_retry_and_permanent_ones_need_attention() {
        let def = transfer();
        let failing = [
            SagaEvent::Started,
            ok(0, json!({})),
            SagaEvent::StepTimedOut {
                step: 1,
                attempt: 1,
            },
        ];
        let (state, _) = given(&def, &failing);
        let (state, cmds) = react(
            &def,
            &state,
            &SagaEvent::CompensationFailed {
                step: 0,
                attempt: 1,
                reason: "db down".into(),
                permanent: false,
            },
        );
        assert_eq!(cmds.len(), 1);
        assert_eq!(cmds[0].id, "t-1/reserve/2/undo");
        let (state, cmds) = react(
            &def,
            &state,
            &SagaEvent::CompensationFailed {
                step: 0,
                attempt: 2,
                reason: "account a was closed meanwhile".into(),
                permanent: true,
            },
        );
        assert!(cmds.is_empty());
        match &state.status {
            Status::NeedsAttention { reason, .. } => assert!(reason.contains("closed meanwhile")),
            other => panic!("{other:?}"),
        }
        assert!(state.status.is_final());
    }

    #[test]
    fn an_operator_retry_sends_the_failed_compensation_again() {
        let def = transfer();
        let (state, _) = given(
            &def,
            &[
                SagaEvent::Started,
                ok(0, json!({})),
                SagaEvent::StepFailed {
                    step: 1,
                    attempt: 1,
                    reason: "closed".into(),
                },
                SagaEvent::CompensationFailed {
                    step: 0,
                    attempt: 1,
                    reason: "source closed".into(),
                    permanent: true,
                },
            ],
        );
        assert!(matches!(
            state.status,
            Status::NeedsAttention { step: 0, .. }
        ));
        let retry = SagaEvent::Retried {
            note: "source reopened".into(),
        };
        let (state, cmds) = react(&def, &state, &retry);
        assert_eq!(cmds.len(), 1);
        assert_eq!(cmds[0].id, "t-1/reserve/2/undo");
        let (state, _) = react(
            &def,
            &state,
            &SagaEvent::CompensationSucceeded {
                step: 0,
                attempt: 2,
            },
        );
        assert!(matches!(state.status, Status::Compensated { .. }));
        // A retry of a saga that does not need attention changes nothing.
        let (same, cmds) = react(&def, &state, &retry);
        assert_eq!(same, state);
        assert!(cmds.is_empty());
    }

    #[test]
    fn late_replies_and_stale_timeouts_change_nothing() {
        let def = transfer();
        let (state, _) = given(&def, &[SagaEvent::Started, ok(0, json!({}))]);
        // The deadline of step 0 fires after it completed: ignored.
        let (same, cmds) = react(
            &def,
            &state,
            &SagaEvent::StepTimedOut {
                step: 0,
                attempt: 1,
            },
        );
        assert_eq!(same, state);
        assert!(cmds.is_empty());
        // A duplicate reply for step 0: ignored.
        let (same, cmds) = react(&def, &state, &ok(0, json!({})));
        assert_eq!(same, state);
        assert!(cmds.is_empty());
        // Started twice: ignored.
        let (same, _) = react(&def, &state, &SagaEvent::Started);
        assert_eq!(same, state);
        // A completed saga ignores everything.
        let (done, _) = given(
            &def,
            &[
                SagaEvent::Started,
                ok(0, json!({})),
                ok(1, json!({})),
                ok(2, json!({})),
            ],
        );
        let (same, cmds) = react(
            &def,
            &done,
            &SagaEvent::StepTimedOut {
                step: 2,
                attempt: 1,
            },
        );
        assert_eq!(same.status, Status::Completed);
        assert!(cmds.is_empty());
    }

    fn dead_lettered(kind: CommandKind, step: usize, attempt: u32) -> SagaEvent {
        SagaEvent::CommandDeadLettered {
            kind,
            step,
            attempt,
            command: "t-1/x".into(),
            consumer: "handler".into(),
            dead_letter: 7,
            reason: "parked behind 3".into(),
        }
    }

    fn deadline(kind: CommandKind, step: usize, attempt: u32, claimed: bool) -> SagaEvent {
        SagaEvent::DeadlinePassed {
            armed: 1,
            kind,
            step,
            attempt,
            claimed,
            deadline_ms: 2_000,
        }
    }

    #[test]
    fn a_dead_lettered_action_needs_attention_and_a_retry_sends_the_next_attempt() {
        let def = transfer();
        let (state, _) = given(
            &def,
            &[
                SagaEvent::Started,
                ok(0, json!({})),
                dead_lettered(CommandKind::Action, 1, 1),
            ],
        );
        match &state.status {
            Status::NeedsAttention {
                step: 1,
                retry: CommandKind::Action,
                reason,
            } => assert!(reason.contains("dead letter 7"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // A dead letter of another attempt or step changes nothing.
        let (same, cmds) = react(&def, &state, &dead_lettered(CommandKind::Action, 0, 1));
        assert_eq!(same, state);
        assert!(cmds.is_empty());
        let retry = SagaEvent::Retried { note: "ops".into() };
        let (next, cmds) = react(&def, &state, &retry);
        assert_eq!(next.status, Status::Running { step: 1 });
        assert_eq!(cmds.len(), 1);
        assert_eq!(cmds[0].id, "t-1/deposit/2");
        assert_eq!(cmds[0].effect_key("t-1"), "t-1/deposit", "same effect key");
        assert!(cmds[0].deadline.is_some());
    }

    #[test]
    fn the_overall_deadline_compensates_only_what_is_safe() {
        let def = transfer();
        let running = [SagaEvent::Started, ok(0, json!({}))];
        // Unclaimed action: compensate the completed steps.
        let (state, cmds) = given(
            &def,
            &[
                running[0].clone(),
                running[1].clone(),
                deadline(CommandKind::Action, 1, 1, false),
            ],
        );
        assert!(matches!(state.status, Status::Compensating { step: 0, .. }));
        assert_eq!(cmds.last().unwrap().id, "t-1/reserve/1/undo");
        // Claimed action: ask for help; its late reply still counts.
        let (state, cmds) = given(
            &def,
            &[
                running[0].clone(),
                running[1].clone(),
                deadline(CommandKind::Action, 1, 1, true),
            ],
        );
        assert_eq!(cmds.len(), 2, "nothing sent by the deadline");
        assert!(matches!(
            state.status,
            Status::NeedsAttention {
                retry: CommandKind::Action,
                ..
            }
        ));
        let (next, cmds) = react(&def, &state, &ok(1, json!({})));
        assert_eq!(next.status, Status::Running { step: 2 });
        assert_eq!(cmds[0].id, "t-1/complete/1");
        // A compensation in flight: ask for help.
        let (state, _) = given(
            &def,
            &[
                SagaEvent::Started,
                ok(0, json!({})),
                SagaEvent::StepFailed {
                    step: 1,
                    attempt: 1,
                    reason: "closed".into(),
                },
                deadline(CommandKind::Compensation, 0, 1, false),
            ],
        );
        assert!(matches!(
            state.status,
            Status::NeedsAttention {
                retry: CommandKind::Compensation,
                step: 0,
                ..
            }
        ));
        // Ended: ignored.
        let (done, _) = given(
            &def,
            &[
                SagaEvent::Started,
                ok(0, json!({})),
                ok(1, json!({})),
                ok(2, json!({})),
            ],
        );
        let (same, _) = react(&def, &done, &deadline(CommandKind::Action, 2, 1, false));
        assert_eq!(same, done);
    }

    #[test]
    fn resolve_and_abandon_end_a_saga_that_needs_attention_and_nothing_else() {
        let def = transfer();
        let (stuck, _) = given(
            &def,
            &[SagaEvent::Started, dead_lettered(CommandKind::Action, 0, 1)],
        );
        let resolve = SagaEvent::Resolved {
            outcome: Outcome::Compensated,
            note: "checked".into(),
        };
        let (resolved, cmds) = react(&def, &stuck, &resolve);
        assert!(cmds.is_empty());
        assert!(matches!(
            resolved.status,
            Status::Resolved {
                outcome: Outcome::Compensated,
                ..
            }
        ));
        assert!(resolved.status.is_final());
        let abandon = SagaEvent::Abandoned {
            note: "by hand".into(),
        };
        let (abandoned, cmds) = react(&def, &stuck, &abandon);
        assert!(cmds.is_empty());
        assert!(matches!(abandoned.status, Status::Abandoned { .. }));
        // Anywhere else they change nothing; late replies after them too.
        let (running, _) = given(&def, &[SagaEvent::Started]);
        assert_eq!(react(&def, &running, &resolve).0, running);
        assert_eq!(react(&def, &running, &abandon).0, running);
        assert_eq!(react(&def, &resolved, &ok(0, json!({}))).0, resolved);
        assert_eq!(
            react(&def, &abandoned, &SagaEvent::Retried { note: "x".into() }).0,
            abandoned
        );
    }

    #[test]
    fn definitions_are_checked() {
        assert!(matches!(
            Definition::<Transfer>::new("x").build().unwrap_err(),
            SagaError::Empty("x")
        ));
        let dup = Definition::<Transfer>::new("x")
            .step("a")
            .invoke("c", |_| json!({}))
            .step("a")
            .invoke("c", |_| json!({}))
            .build()
            .unwrap_err();
        assert!(matches!(dup, SagaError::DuplicateStep { step: "a", .. }));
        assert_eq!(transfer().step_names(), ["reserve", "deposit", "complete"]);
    }

    #[test]
    fn events_and_commands_serialize_for_the_log() {
        let e = SagaEvent::StepFailed {
            step: 1,
            attempt: 1,
            reason: "closed".into(),
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(
            s,
            r#"{"event":"step_failed","step":1,"attempt":1,"reason":"closed"}"#
        );
        assert_eq!(serde_json::from_str::<SagaEvent>(&s).unwrap(), e);
        let st = Status::Compensating {
            step: 0,
            reason: "r".into(),
        };
        assert_eq!(
            serde_json::to_string(&st).unwrap(),
            r#"{"status":"compensating","step":0,"reason":"r"}"#
        );
    }
}
