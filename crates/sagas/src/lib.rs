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
//! The durable runtime (every transition appended to
//! `events.saga-<name>.<saga-id>` before its commands are sent, commands and
//! replies over NATS, timeouts that fire with every orchestrator down) builds
//! on this model and on `sluice-workers`.

mod model;

pub use model::{
    Command, CommandKind, Definition, SagaError, SagaEvent, SagaState, Status, StepBuilder, react,
};
