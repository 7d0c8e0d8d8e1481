//! The ground Sluice stands on: the CloudEvents envelope, the event store on
//! NATS JetStream, and the pure decide/evolve aggregate shape.
//!
//! Guarantees:
//! - Every event lives on `events.<category>.<id>` in the `EVENTS` stream; the
//!   stream sequence is its global position, and an aggregate's *version* is the
//!   stream sequence of its last event (what `Nats-Expected-Last-Subject-Sequence`
//!   checks).
//! - `append` of N events to one aggregate is atomic (one JetStream atomic batch).
//! - A retried append (same event ids) never lands twice: the server dedups by
//!   `Nats-Msg-Id`, and when it answers a retry with "wrong last sequence" the
//!   store checks whether the events after the expected version are its own.
//! - An event id names one event: a "duplicate" from the server counts as a
//!   retry only when the stored event is the same (id, aggregate, type and
//!   data); an id that names another event is [`Error::IdReused`], never a
//!   success. These checks run only when the server reports a duplicate or a
//!   conflict, so the common append costs nothing more.
//! - Concurrent appends to different aggregates are group-committed: written
//!   as one atomic batch (one fsync), each with its own expectation, and each
//!   caller still gets its own exact outcome (see `docs/group-commit.md`).
//! - A command with an idempotency key ([`execute_keyed`]) takes effect once
//!   per key: the key's record in the `SLUICE_IDEMPOTENCY` bucket answers a
//!   repeat with the first response, and refuses the key for anything else.
//! - Conflicts surface as [`Error::Conflict`] with the expected and actual
//!   versions, decided from the server's error code, never from error text.
#![warn(clippy::unwrap_used)]

mod aggregate;
mod catalog;
mod connect;
mod embedded;
mod envelope;
mod error;
mod idempotency;
mod ids;
mod server;
mod store;
pub mod trace;
mod void;

pub use aggregate::{Aggregate, ExecuteError, ExecuteOutcome, execute, load};
pub use catalog::{Catalog, RESERVED_PREFIXES, Violation};
pub use connect::{ConnectConfig, redact_url};
pub use embedded::{
    Credentials, EMBEDDED_ADMIN_USER, EmbeddedAuth, EmbeddedConfig, EmbeddedServer,
    NATS_SERVER_BIN_ENV, SyncInterval, binary_version, find_nats_server_bin,
};
pub use envelope::{
    CONTENT_TYPE_JSON, CONTENT_TYPE_STRUCTURED, DEFAULT_MAX_PAYLOAD, Envelope, NewEvent,
    SPEC_VERSION,
};
pub use error::Error;
pub use idempotency::{
    CommandOutcome, DEFAULT_RETENTION as DEFAULT_IDEMPOTENCY_RETENTION, IDEMPOTENCY_BUCKET,
    Idempotency, IdempotencyConfig, IdempotentCommand, execute_keyed, validate_idempotency_key,
};
pub use ids::{EventId, StreamId, validate_token};
pub use server::{MIN_SERVER_VERSION, ServerVersion, check_server_version};
pub use store::{
    AppendResult, BATCH_SIZE_BUCKETS, BatchSizeBucket, EVENTS_STREAM, EventStore, ExpectedVersion,
    GroupCommitConfig, GroupCommitStats, History, RecordedEvent, StoreConfig, StreamState,
    VOID_CATEGORY, Voided,
};
pub use trace::TraceParent;
pub use void::{VOIDED, Voiding};
