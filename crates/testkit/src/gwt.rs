//! Given/when/then for aggregates: pure, no runtime.

use std::fmt::Debug;

use sluice_events::Aggregate;

/// Starts a given/when/then test from past events.
pub fn given<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let state = events
        .into_iter()
        .fold(A::default(), |state, e| state.evolve(&e));
    Given { state }
}

/// An aggregate state built from past events.
#[derive(Debug)]
pub struct Given<A> {
    state: A,
}

impl<A: Aggregate> Given<A>
where
    A::Event: PartialEq + Debug,
{
    /// Asserts that `command` produces exactly `expected`.
    #[track_caller]
    pub fn when_then(&self, command: A::Command, expected: Vec<A::Event>) {
        match self.state.decide(&command) {
            Ok(events) => assert_eq!(events, expected, "unexpected events"),
            Err(e) => panic!("expected events {expected:?}, command was rejected: {e}"),
        }
    }

    /// Asserts that `command` is rejected, and returns the rejection.
    #[track_caller]
    pub fn when_rejected(&self, command: A::Command) -> A::Rejection {
        match self.state.decide(&command) {
            Ok(events) => panic!("expected a rejection, got events {events:?}"),
            Err(e) => e,
        }
    }

    /// The state, for assertions on it.
    pub fn state(&self) -> &A {
        &self.state
    }
}
