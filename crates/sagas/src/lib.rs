//! Sagas (issue: sagas): pure `react(&state, &event) -> (state, commands)`
//! state machines whose every transition is appended before commands are sent,
//! with compensations in reverse order and durable step timeouts.
//!
//! Not built yet: this crate reserves its place in the dependency order.
