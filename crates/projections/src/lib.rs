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

mod bookkeeping;
mod db;
mod dlq;
mod error;
mod keyed;
mod projection;
mod rebuild;
mod replay;
mod runner;
mod state_rows;
mod status;

pub use bookkeeping::{DeadLetterRecord, dead_letters, read_checkpoint};
pub use db::{Backend, Database, is_transient};
pub use dlq::{
    DLQ_PREFIX, DLQ_STREAM, DeadLetterKind, INVALID_CATEGORY, consumer_name, discard,
    discard_position, headers, projection_of,
};
pub use error::Error;
pub use keyed::{Column, ColumnType, KeyedReadModel, KeyedTable};
pub use projection::{
    Page, ProjectedEvent, Projection, REBUILD_SUFFIX, ReadModel, Rejection, RewindSupport, Tables,
};
pub use rebuild::{RebuildProgress, RebuildReport, rebuild, rebuild_group, reset, reset_member};
pub use replay::{RedriveReport, ReplayReport, redrive, redrive_dead_letter, replay};
pub use runner::{
    FailurePolicy, Live, LiveStatus, Member, RunState, Runner, RunnerConfig, RunningGroup,
    RunningProjection, spawn, spawn_group,
};
pub use state_rows::{RowChange, StateRows};
pub use status::{Halt, ProjectionStatus, projection_status};
