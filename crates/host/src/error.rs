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
    /// [`crate::run`] did not start: `what` it was doing, and why. Nothing
    /// it started is left running.
    #[error("{what}")]
    Start {
        /// The step that failed (e.g. "starting the embedded nats-server").
        what: &'static str,
        /// Why.
        #[source]
        source: crate::BoxError,
    },
    /// `up` already runs on this home (its endpoint file names a live
    /// process).
    #[error(
        "{binary} up is already running here (pid {pid}, NATS at {nats_url}); stop it first or use another --home"
    )]
    AlreadyRunning {
        /// The binary's name.
        binary: &'static str,
        /// The process that runs it.
        pid: u32,
        /// Its NATS server.
        nats_url: String,
    },
    /// `strict` and the event stream could lose acknowledged writes.
    #[error("refusing to start (--strict): {warnings}")]
    Strict {
        /// The durability warnings, `; `-separated.
        warnings: String,
    },
    /// A role's task failed or panicked; the others were stopped with it.
    #[error("{task} stopped with an error")]
    Role {
        /// The task (module and name, e.g. `ledger ledger-account-commands`).
        task: String,
        /// Its error, or the panic.
        #[source]
        source: crate::BoxError,
    },
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The process exit code: 2 for usage mistakes, 1 otherwise.
    ///
    /// ```
    /// let e = sluice_host::Error::NotConfirmed("pass --yes to confirm");
    /// assert_eq!(e.exit_code(), 2);
    /// ```
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
