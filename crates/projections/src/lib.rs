//! Projections: read models in SQL (SQLite, the embedded default in WAL
//! mode, and PostgreSQL, through one sqlx code path) fed by the event log.
//!
//! Guarantees:
//! - **Exactly once in the read model.** A batch of events and the
//!   checkpoint (the last stream sequence applied) are written in one SQL
//!   transaction; the checkpoint update is a compare-and-set, so two runners
//!   of one projection cannot both apply a batch. A crash at any point leaves
//!   either the whole batch and its checkpoint, or neither.
//! - **Resume from SQL, not from the broker.** On start a runner reads its
//!   checkpoint and opens an ordered (ephemeral) consumer right after it.
//! - **Never skip on database trouble.** Any database or broker error while
//!   applying a batch blocks the projection and retries the same batch with
//!   exponential backoff and jitter, forever; the status shows the error.
//! - **Permanent failures** (an event breaks the envelope contract, or the
//!   projection rejects it) follow the [`FailurePolicy`]: `dead_letter`
//!   copies it to the `DLQ` stream with the reason and parks its aggregate
//!   for this projection (later events of it are dead-lettered behind it,
//!   never applied out of order; persisted in `sluice_parked`), or `halt`
//!   stops the projection before it.
//!
//! The HTTP query API over these read models is the host's (`sluice-host`).
#![warn(clippy::unwrap_used)]

mod db;
mod dlq;
mod error;
mod projection;
mod rebuild;
mod replay;
mod runner;
mod status;

pub use db::{Backend, Database, is_transient};
pub use dlq::{
    DLQ_PREFIX, DLQ_STREAM, DeadLetterKind, INVALID_CATEGORY, discard, discard_position, headers,
    projection_of, redrive_dead_letter,
};
pub use error::Error;
pub use projection::{
    Page, ProjectedEvent, Projection, REBUILD_SUFFIX, ReadModel, Rejection, RewindSupport, Tables,
};
pub use rebuild::{RebuildProgress, RebuildReport, rebuild, rebuild_group, reset, reset_member};
pub use replay::{DeadLetterRecord, RedriveReport, ReplayReport, dead_letters, redrive, replay};
pub use runner::{
    FailurePolicy, Live, LiveStatus, Member, RunState, Runner, RunnerConfig, consumer_name,
    read_checkpoint,
};
pub use status::{Halt, ProjectionStatus, projection_status};

/// A projection running on a tokio task (alone or in a group).
#[derive(Debug, Clone)]
pub struct RunningProjection {
    /// Its name.
    pub name: &'static str,
    /// Its live status (for the HTTP API).
    pub live: LiveStatus,
}

/// A runner on its own task: one projection or a group.
#[derive(Debug)]
pub struct RunningGroup {
    /// The projections it runs.
    pub projections: Vec<RunningProjection>,
    /// The task; ends on shutdown (`Ok`) or a halt (`Err(Error::Halted)`).
    pub task: tokio::task::JoinHandle<Result<(), Error>>,
}

/// Starts a runner for one `projection` on its own task.
pub async fn spawn<P: Projection>(
    projection: std::sync::Arc<P>,
    db: Database,
    store: sluice_events::EventStore,
    config: RunnerConfig,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<RunningGroup, Error> {
    spawn_group(vec![Member::from(projection)], db, store, config, shutdown).await
}

/// Starts one runner feeding several projections (one feed, one decode,
/// one transaction per batch; each keeps its own checkpoint and status).
pub async fn spawn_group(
    members: Vec<Member>,
    db: Database,
    store: sluice_events::EventStore,
    config: RunnerConfig,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<RunningGroup, Error> {
    let runner = Runner::group(members, db, store, config).await?;
    let projections = runner
        .lives()
        .into_iter()
        .map(|(name, live)| RunningProjection { name, live })
        .collect();
    let task = tokio::spawn(async move {
        let result = runner.run(shutdown).await;
        if let Err(e) = &result {
            tracing::error!(error = %e, "projection runner stopped");
        }
        result
    });
    Ok(RunningGroup { projections, task })
}
