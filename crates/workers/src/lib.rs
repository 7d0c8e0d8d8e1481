//! Durable consumer runtime for Sluice: handlers that return `Ok`,
//! `Transient` or `Permanent`, per-aggregate ordering with parallelism,
//! retries with exponential backoff and jitter, sequence-aware dead-lettering
//! to the `DLQ` stream, and the operator API behind `sluice dlq`.
//!
//! Guarantees (details in `docs/workers.md`):
//! - **At least once.** An event is acked only after its handler returned
//!   `Ok`, or after its dead-letter copy was stored (awaited). A crash
//!   redelivers what was in flight, so handlers must be idempotent (keyed by
//!   the event id or [`Delivery::sequence`]).
//! - **Per-aggregate order.** Events of one aggregate (one subject) are
//!   handled one at a time in stream order, also across delayed retries,
//!   with `concurrency` aggregates in parallel per process and one replica
//!   per partition consumer at a time (pinned client).
//! - **Sequence-aware dead letters.** Once an event of aggregate X is
//!   dead-lettered for a consumer, later events of X for that consumer are
//!   dead-lettered *behind* it (parked) until the operator redrives or
//!   discards the head; other aggregates keep flowing. The parked set lives
//!   in a KV bucket and survives restarts.
//! - **Nothing silently dropped.** Events that break the CloudEvents
//!   contract are dead-lettered with the decoder's precise reason; panics are
//!   caught as permanent failures; a worker that crashes or hangs on a
//!   message still leaves a dead letter through the server's advisories.
//! - **Voided events are skipped.** An event an operator voided is acked
//!   without running the handler; its dead letter, when it heads a parked
//!   aggregate, is handed back so the aggregate is released.
#![warn(clippy::unwrap_used)]

mod advisory;
mod config;
pub mod consumers;
pub mod dlq;
mod error;
mod handler;
mod health;
mod infra;
mod lane;
mod park;
mod policy;
mod runtime;
mod voids;

pub use config::{
    LateRedelivery, WorkerConfig, advisory_consumer_name, partition_consumer_names,
    redrive_consumer_name,
};
pub use error::Error;
pub use handler::{BoxError, Delivery, Handler, HandlerError, HandlerResult};
pub use health::{WorkerHalt, worker_halts};
pub use infra::{
    ADVISORY_STREAM, AUDIT_PREFIX, AUDIT_STREAM, DLQ_PREFIX, DLQ_STREAM, INVALID_CATEGORY,
    PARKED_BUCKET, REDRIVE_PREFIX, REDRIVE_STREAM, headers, partition_of, subject_hash,
};
pub use park::Parked;
pub use policy::{Action, Outcome, RetryPolicy, decide};
pub use runtime::{Repartitioned, TakenOver, ensure_consumers, repartition, run, take_over};
