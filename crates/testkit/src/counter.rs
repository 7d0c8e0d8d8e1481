//! A minimal aggregate for harness and store tests: a counter that can be
//! closed. Small enough to read at a glance, real enough to conflict.

use sluice_events::{Aggregate, Envelope, Error, NewEvent};

/// The counter's state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counter {
    /// Sum of everything added.
    pub value: u64,
    /// No more additions once closed.
    pub closed: bool,
}

/// What callers ask of a counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CounterCommand {
    /// Add a positive amount.
    Add(u64),
    /// Close it (idempotent).
    Close,
}

/// What happened to a counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CounterEvent {
    /// An amount was added.
    Added(u64),
    /// It was closed.
    Closed,
}

/// Why a counter refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CounterRejection {
    /// Adding to a closed counter.
    #[error("the counter is closed")]
    Closed,
    /// Adding zero.
    #[error("amount must be positive")]
    Zero,
}

impl Aggregate for Counter {
    const CATEGORY: &'static str = "counter";
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Rejection = CounterRejection;

    fn decide(&self, command: &CounterCommand) -> Result<Vec<CounterEvent>, CounterRejection> {
        match command {
            CounterCommand::Add(_) if self.closed => Err(CounterRejection::Closed),
            CounterCommand::Add(0) => Err(CounterRejection::Zero),
            CounterCommand::Add(n) => Ok(vec![CounterEvent::Added(*n)]),
            CounterCommand::Close if self.closed => Ok(vec![]),
            CounterCommand::Close => Ok(vec![CounterEvent::Closed]),
        }
    }

    fn evolve(mut self, event: &CounterEvent) -> Self {
        match event {
            CounterEvent::Added(n) => self.value += n,
            CounterEvent::Closed => self.closed = true,
        }
        self
    }

    fn encode(event: &CounterEvent) -> Result<NewEvent, Error> {
        Ok(match event {
            CounterEvent::Added(n) => {
                NewEvent::new("test.counter.added.v1", format!(r#"{{"n":{n}}}"#))
            }
            CounterEvent::Closed => NewEvent::new("test.counter.closed.v1", "{}"),
        })
    }

    fn decode(envelope: &Envelope) -> Result<CounterEvent, Error> {
        match envelope.event_type.as_str() {
            "test.counter.added.v1" => {
                let v: serde_json::Value = envelope.data_as()?;
                v["n"]
                    .as_u64()
                    .map(CounterEvent::Added)
                    .ok_or_else(|| Error::InvalidJson("field n must be an integer".into()))
            }
            "test.counter.closed.v1" => Ok(CounterEvent::Closed),
            other => Err(Error::InvalidEventType(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::given;

    #[test]
    fn given_when_then() {
        given::<Counter>([]).when_then(CounterCommand::Add(2), vec![CounterEvent::Added(2)]);
        given::<Counter>([CounterEvent::Added(2), CounterEvent::Closed])
            .when_then(CounterCommand::Close, vec![]);
        let r = given::<Counter>([CounterEvent::Closed]).when_rejected(CounterCommand::Add(1));
        assert_eq!(r, CounterRejection::Closed);
        assert_eq!(
            given::<Counter>([]).when_rejected(CounterCommand::Add(0)),
            CounterRejection::Zero
        );
        assert_eq!(
            given::<Counter>([CounterEvent::Added(2), CounterEvent::Added(3)])
                .state()
                .value,
            5
        );
    }

    #[test]
    fn events_round_trip_through_the_envelope() {
        for e in [CounterEvent::Added(7), CounterEvent::Closed] {
            let new = Counter::encode(&e).unwrap();
            let env = Envelope::decode(Some(&new.headers("c-1")), &new.data, 1024).unwrap();
            assert_eq!(Counter::decode(&env).unwrap(), e);
        }
    }
}
