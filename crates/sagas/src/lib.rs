//! Sagas: multi-step flows that undo themselves.
//!
//! A saga is a pure state machine, [`react`]`(definition, &state, &event) ->
//! (state, commands)`, over a declarative [`Definition`] written step by step
//! (action → compensation → reply handling → deadline), in the spirit of
//! Eventuate's `step().invoke().withCompensation()` but as plain Rust with no
//! runtime, so flows are tested with given/when/then.
//!
//! Semantics:
//! - Steps run in order; each action is a [`Command`] with a deterministic id
//!   `<saga-id>/<step>/<attempt>`, so a resend after a crash is deduplicated
//!   by the receiver.
//! - When a step fails permanently or its deadline passes, the compensations
//!   of the completed steps run in reverse order.
//! - A compensation that fails transiently is sent again (next attempt, the
//!   runtime adds backoff); one that fails permanently puts the saga in
//!   [`Status::NeedsAttention`] with the reason: it never ends half-done.
//! - Late replies and timeouts for a step that is no longer current are
//!   ignored (they change nothing and send nothing).
//!
//! The durable runtime (details in `docs/sagas.md`):
//! - Each instance is its own aggregate stream `events.saga-<name>.<saga-id>`
//!   ([`saga_stream`]); every transition (start, claim, reply, timeout) is an
//!   event appended with optimistic concurrency against the log it extends
//!   ([`append_guarded`]), so concurrent writers never advance an instance
//!   twice: the loser reloads and finds the question answered.
//! - Commands are events on `events.cmd-<category>.<target-id>` with the
//!   command id as event id ([`send_command`]); a worker per aggregate type
//!   ([`run_command_handler`]) loads the target, decides, claims, appends and
//!   replies into the saga's stream. Durable both ways: a command waits in
//!   `EVENTS` while its handler is down, and the reply is an appended event.
//! - The orchestrator ([`run_orchestrator`]) is a worker on the saga's
//!   streams: for every stored transition it sends that transition's
//!   commands, so they always go out *after* the transition is durable, and
//!   again (deduplicated) after a crash.
//! - Deadlines are scheduled messages on `SAGA_TIMERS` (nats-server message
//!   scheduling): they fire with every orchestrator down and are handled by
//!   the next one; a claim or a reply makes a later timeout a no-op.
//! - Sagas always end or ask for help: each instance has an overall
//!   deadline ([`Definition::saga_deadline`]); a command the saga waits for
//!   that the worker runtime dead-letters moves it to `needs_attention`
//!   (the orchestrator reads its handlers' dead letters); an operator then
//!   retries, resolves or abandons it ([`operate`]), each a transition of
//!   its own.

mod command_handler;
mod history;
mod log;
mod model;
mod orchestrator;

pub use command_handler::{
    CommandMapper, Handled, ReplyBuilder, handle_command, run_command_handler,
};
pub use history::{IssuedCommand, Transition, describe_status, history};
pub use log::{
    ABANDONED, COMMAND, COMMAND_CATEGORY_PREFIX, COMMAND_DEAD_LETTERED, COMPENSATION_FAILED,
    COMPENSATION_SUCCEEDED, CommandMessage, CommandStatus, DEADLINE_PASSED, Guarded, Observed,
    OperatorAction, RESOLVED, RETRIED, Reaction, SAGA_CATEGORY_PREFIX, STARTED, STEP_CLAIMED,
    STEP_FAILED, STEP_SUCCEEDED, STEP_TIMED_OUT, SagaLog, SagaRecord, Started, append_guarded,
    command_target, event_type, list_instances, observe, operate, read_log, saga_stream, start,
};
pub use model::{
    Command, CommandKind, DEFAULT_SAGA_DEADLINE, Definition, Outcome, SagaError, SagaEvent,
    SagaState, Status, StepBuilder, react,
};
pub use orchestrator::{
    DeadCommand, H_SCHEDULE, H_SCHEDULE_TARGET, OrchestratorConfig, TIMERS_PREFIX, TIMERS_STREAM,
    ensure_timers_stream, record_dead_letter, record_deadline, record_timeout, run_orchestrator,
    send_command,
};
