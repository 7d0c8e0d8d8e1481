//! The one error type of the host's library calls.

/// What went wrong in a host call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The projection runtime or its database failed.
    #[error(transparent)]
    Projections(#[from] sluice_projections::Error),
    /// The event store failed.
    #[error(transparent)]
    Events(#[from] sluice_events::Error),
    /// No projection of that name in this binary's modules.
    #[error("unknown projection {name:?}; known: {known}")]
    UnknownProjection {
        /// The name asked for (at most 64 characters of it).
        name: String,
        /// The projections there are, comma-separated.
        known: String,
    },
    /// No row with that key.
    #[error("no row {key:?} in {projection}")]
    NotFound {
        /// The projection.
        projection: String,
        /// The key asked for.
        key: String,
    },
    /// A destructive command without its confirmation flag.
    #[error("{0}")]
    NotConfirmed(&'static str),
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The process exit code: 2 for usage mistakes, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::UnknownProjection { .. }
            | Self::NotConfirmed(_)
            | Self::Projections(
                sluice_projections::Error::RewindUnsupported { .. }
                | sluice_projections::Error::ReplayOutOfRange { .. },
            ) => 2,
            _ => 1,
        }
    }
}
