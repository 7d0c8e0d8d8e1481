//! A projection's status: checkpoint, lag in events and seconds, state.

use serde::Serialize;
use sluice_events::EventStore;
use time::OffsetDateTime;

use crate::bookkeeping;
use crate::db::Database;
use crate::error::Error;
use crate::projection::REBUILD_SUFFIX;
use crate::runner::{LiveStatus, RunState};

/// What `GET /v1/projections` and `sluice projection list` show.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectionStatus {
    /// The projection's constant name.
    pub name: String,
    /// `running`, `rebuilding`, `halted` (or `starting`/`stopped`).
    pub state: RunState,
    /// Last stream sequence whose effect is in the read model.
    pub checkpoint: u64,
    /// Last stream sequence of the log.
    pub stream_last_position: u64,
    /// Events appended after the checkpoint.
    pub lag_events: u64,
    /// Age of the oldest event not yet applied (0 when caught up).
    pub lag_seconds: f64,
    /// Where and why the `halt` policy stopped it.
    pub halted: Option<Halt>,
    /// The transient error it is retrying right now, if any.
    pub last_error: Option<String>,
    /// Events it dead-lettered (rejected or parked behind a rejected one).
    pub dead_letters: u64,
    /// Aggregates parked behind a dead letter.
    pub parked_aggregates: u64,
    /// Position a blue/green rebuild in progress has reached.
    pub rebuild_position: Option<u64>,
}

/// A halt recorded by the `halt` policy.
#[derive(Debug, Clone, Serialize)]
pub struct Halt {
    /// Stream sequence of the event it stopped before.
    pub position: u64,
    /// Why that event was rejected.
    pub reason: String,
}

/// Reads the status of `name` from the database and the log, merged with
/// what the in-process runner knows (`live`, when it runs here).
pub async fn projection_status(
    db: &Database,
    store: &EventStore,
    name: &str,
    live: Option<&LiveStatus>,
) -> Result<ProjectionStatus, Error> {
    let (checkpoint, halted) = match bookkeeping::checkpoint_and_halt(db.pool(), name).await? {
        Some((checkpoint, halted)) => (
            checkpoint,
            halted.map(|(position, reason)| Halt { position, reason }),
        ),
        None => (0, None),
    };
    let (dead_letters, parked_aggregates) = bookkeeping::record_counts(db.pool(), name).await?;
    let rebuild_position =
        bookkeeping::stored_checkpoint(db.pool(), &format!("{name}{REBUILD_SUFFIX}")).await?;
    let live = live.map(LiveStatus::snapshot);
    // The runner may be ahead of a read that raced its commit: take the max.
    let checkpoint = checkpoint.max(live.as_ref().map_or(0, |l| l.checkpoint));
    let stream_last_position = store.stream_state().await?.last_position;
    let lag_events = stream_last_position.saturating_sub(checkpoint);
    let lag_seconds = if lag_events == 0 {
        0.0
    } else {
        oldest_unapplied_age(store, checkpoint + 1).await
    };
    let state = match (&halted, &live) {
        (Some(_), _) => RunState::Halted,
        (None, _) if rebuild_position.is_some() => RunState::Rebuilding,
        (None, Some(l)) => l.state,
        (None, None) => RunState::Running,
    };
    Ok(ProjectionStatus {
        name: name.to_owned(),
        state,
        checkpoint,
        stream_last_position,
        lag_events,
        lag_seconds,
        halted,
        last_error: live.and_then(|l| l.last_error),
        dead_letters,
        parked_aggregates,
        rebuild_position,
    })
}

/// Seconds since the event at `position` was appended (0 if unknown).
async fn oldest_unapplied_age(store: &EventStore, position: u64) -> f64 {
    let Ok(stream) = store.event_stream().await else {
        return 0.0;
    };
    match stream.get_raw_message(position).await {
        Ok(m) => (OffsetDateTime::now_utc() - m.time)
            .as_seconds_f64()
            .max(0.0),
        Err(_) => 0.0,
    }
}
