//! Aggregates as pure functions (`decide`, `evolve`) and one async shell that
//! loads, decides and appends with optimistic concurrency.

use crate::envelope::{Envelope, NewEvent};
use crate::error::Error;
use crate::idempotency::Attempt;
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
    let (state, version, _) = load_marked::<A>(store, id, None).await?;
    Ok((state, version))
}

/// [`load`], also collecting the positions of the events an idempotent
/// attempt appended before (an earlier try that landed).
async fn load_marked<A: Aggregate>(
    store: &EventStore,
    id: &StreamId,
    attempt: Option<&Attempt<'_>>,
) -> Result<(A, u64, Vec<u64>), Error> {
    let history = store.history_direct(id).await?;
    let mut state = A::default();
    let mut earlier = Vec::new();
    for recorded in &history.events {
        if let Some(a) = attempt
            && a.is_ours(id, recorded)?
        {
            earlier.push(recorded.position);
        }
        let event = recorded.decoded(A::decode(&recorded.envelope))?;
        state = state.evolve(&event);
    }
    Ok((state, history.version, earlier))
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
    let (outcome, _) = run::<A>(store, &stream_id, command, max_attempts, None).await?;
    Ok(outcome)
}

/// The one load → decide → append loop. With an `attempt`, the new events
/// carry its ids, and events of an earlier try found in the log are the
/// answer instead of a new decision (then `.1` is true, and the outcome's
/// `events` are empty: they were decided by that try).
pub(crate) async fn run<A: Aggregate>(
    store: &EventStore,
    stream_id: &StreamId,
    command: &A::Command,
    max_attempts: usize,
    attempt: Option<&Attempt<'_>>,
) -> Result<(ExecuteOutcome<A::Event>, bool), ExecuteError<A::Rejection>> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (state, version, earlier) = load_marked::<A>(store, stream_id, attempt).await?;
        if let Some(&last) = earlier.last() {
            let outcome = ExecuteOutcome {
                version: last,
                positions: earlier,
                events: vec![],
                attempts,
            };
            return Ok((outcome, true));
        }
        let events = state.decide(command).map_err(ExecuteError::Rejected)?;
        if events.is_empty() {
            let outcome = ExecuteOutcome {
                version,
                positions: vec![],
                events,
                attempts,
            };
            return Ok((outcome, false));
        }
        let mut encoded = Vec::with_capacity(events.len());
        for (n, event) in events.iter().enumerate() {
            let new = A::encode(event)?;
            encoded.push(match attempt {
                Some(a) => new.with_id(a.event_id(n)?),
                None => new,
            });
        }
        match store
            .append(stream_id, ExpectedVersion::from_version(version), encoded)
            .await
        {
            Ok(r) => {
                let outcome = ExecuteOutcome {
                    version: r.version,
                    positions: r.positions,
                    events,
                    attempts,
                };
                return Ok((outcome, r.deduplicated));
            }
            Err(e) if e.is_conflict() && attempts < max_attempts.max(1) => {
                tracing::debug!(stream = %stream_id, attempts, "conflict; reloading");
            }
            Err(e) => return Err(e.into()),
        }
    }
}
