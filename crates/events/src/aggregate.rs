//! Aggregates as pure functions (`decide`, `evolve`) and one async shell that
//! loads, decides and appends with optimistic concurrency.

use crate::envelope::{Envelope, NewEvent};
use crate::error::Error;
use crate::ids::StreamId;
use crate::store::{EventStore, ExpectedVersion};

/// A consistency boundary: state folded from its events, commands decided
/// against that state. No I/O in here, so it is tested without servers.
pub trait Aggregate: Default + Send + Sync {
    /// Subject category, e.g. `account`.
    const CATEGORY: &'static str;
    /// What callers ask for.
    type Command: Send + Sync;
    /// What happened (the stored facts).
    type Event: Send + Sync + Clone;
    /// Why a command was refused.
    type Rejection: std::error::Error + Send + Sync + 'static;

    /// Decides which events a command produces, or refuses it.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Rejection>;
    /// Folds one event into the state.
    fn evolve(self, event: &Self::Event) -> Self;
    /// Turns a domain event into an envelope to append.
    fn encode(event: &Self::Event) -> Result<NewEvent, Error>;
    /// Reads a stored envelope back into a domain event.
    fn decode(envelope: &Envelope) -> Result<Self::Event, Error>;
}

/// What [`execute`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecuteOutcome<E> {
    /// The aggregate's version after the command.
    pub version: u64,
    /// Positions of the new events (empty when the command was a no-op).
    pub positions: Vec<u64>,
    /// The new events.
    pub events: Vec<E>,
    /// Attempts used (1 unless conflicts forced a reload).
    pub attempts: usize,
}

/// Why [`execute`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError<R: std::error::Error + 'static> {
    /// The aggregate refused the command.
    #[error("command rejected: {0}")]
    Rejected(#[source] R),
    /// The store failed (including a conflict that outlasted every retry).
    #[error(transparent)]
    Store(#[from] Error),
}

/// Loads an aggregate's state and version from the store, skipping voided
/// events (read with [`EventStore::history_direct`], so no consumer is left
/// behind). An event that does not decode is an
/// [`Error::InvalidStoredEvent`] naming its position (the remedy: void it).
pub async fn load<A: Aggregate>(store: &EventStore, id: &StreamId) -> Result<(A, u64), Error> {
    let history = store.history_direct(id).await?;
    let mut state = A::default();
    for recorded in &history.events {
        let event = recorded.decoded(A::decode(&recorded.envelope))?;
        state = state.evolve(&event);
    }
    Ok((state, history.version))
}

/// Load → decide → append, reloading and deciding again on conflict, up to
/// `max_attempts` times.
pub async fn execute<A: Aggregate>(
    store: &EventStore,
    id: &str,
    command: &A::Command,
    max_attempts: usize,
) -> Result<ExecuteOutcome<A::Event>, ExecuteError<A::Rejection>> {
    let stream_id = StreamId::new(A::CATEGORY, id)?;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (state, version) = load::<A>(store, &stream_id).await?;
        let events = state.decide(command).map_err(ExecuteError::Rejected)?;
        if events.is_empty() {
            return Ok(ExecuteOutcome {
                version,
                positions: vec![],
                events,
                attempts,
            });
        }
        let encoded = events
            .iter()
            .map(A::encode)
            .collect::<Result<Vec<_>, _>>()?;
        match store
            .append(&stream_id, ExpectedVersion::from_version(version), encoded)
            .await
        {
            Ok(r) => {
                return Ok(ExecuteOutcome {
                    version: r.version,
                    positions: r.positions,
                    events,
                    attempts,
                });
            }
            Err(e) if e.is_conflict() && attempts < max_attempts.max(1) => {
                tracing::debug!(stream = %stream_id, attempts, "conflict; reloading");
            }
            Err(e) => return Err(e.into()),
        }
    }
}
