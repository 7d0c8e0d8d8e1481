//! The one error type of the projections crate.

/// What went wrong in the projection runtime, its database or its HTTP state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database URL is neither `sqlite:` nor `postgres:`.
    #[error("unsupported database URL {0:?}: use sqlite://<file> or postgres://<host>/<db>")]
    UnsupportedDatabaseUrl(String),
    /// A database operation failed (after the runtime's own retries, if any).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying the schema migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The event store failed.
    #[error(transparent)]
    Events(#[from] sluice_events::Error),
    /// A NATS/JetStream operation failed.
    #[error("NATS {op} failed: {detail}")]
    Nats {
        /// What was being done.
        op: &'static str,
        /// The client's message.
        detail: String,
    },
    /// Binding or serving the HTTP listener failed.
    #[error("HTTP {op} failed: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// A setting is out of range.
    #[error("invalid projection runner config: {0}")]
    InvalidConfig(&'static str),
    /// A background task panicked or was cancelled.
    #[error("{0} task failed: {1}")]
    Task(&'static str, String),
    /// `sluice replay` of a projection that cannot undo events exactly.
    #[error(
        "projection {projection} cannot be replayed from a position: it cannot remove exactly the effects of later events; rebuild it instead (blue/green from position 1, stays online)"
    )]
    RewindUnsupported {
        /// The projection.
        projection: String,
    },
    /// A replay position the projection has not reached (or 0).
    #[error(
        "cannot replay {projection} from position {from}: it has applied events up to {checkpoint}; give a position from 1 to {checkpoint}"
    )]
    ReplayOutOfRange {
        /// The projection.
        projection: String,
        /// The position asked for.
        from: u64,
        /// Its checkpoint.
        checkpoint: u64,
    },
    /// Re-applying events a projection had applied before failed: its
    /// handler is not deterministic (or changed), so a replay cannot be exact.
    #[error(
        "replaying {projection}: it now rejects the event at position {position} it had applied before ({reason}); nothing was changed; rebuild {projection} instead (blue/green from position 1)"
    )]
    ReplayRejected {
        /// The projection.
        projection: String,
        /// The event.
        position: u64,
        /// Why the projection rejects it now.
        reason: String,
    },
    /// A dead-letter operation (the `DLQ` stream side) failed.
    #[error(transparent)]
    DeadLetters(#[from] sluice_workers::Error),
    /// The projection was stopped by its `halt` policy on a bad event.
    #[error("projection {projection} halted at position {position}: {reason}")]
    Halted {
        /// The projection.
        projection: String,
        /// Stream sequence of the event it stopped on.
        position: u64,
        /// Why the event was rejected.
        reason: String,
    },
}

impl Error {
    pub(crate) fn nats(op: &'static str, e: impl std::fmt::Display) -> Self {
        Self::Nats {
            op,
            detail: e.to_string(),
        }
    }
}
