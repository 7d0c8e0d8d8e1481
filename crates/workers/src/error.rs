//! The one error type of the workers crate.

/// What went wrong while running a worker or an operator command.
///
/// Handler failures are not errors of this type: a handler classifies its own
/// failure as [`crate::HandlerError`], and the runtime turns it into an ack, a
/// delayed retry or a dead letter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The worker configuration is inconsistent.
    #[error("invalid worker configuration: {0}")]
    InvalidConfig(String),
    /// A consumer, category or similar name is not a safe subject token.
    #[error(transparent)]
    InvalidName(#[from] sluice_events::Error),
    /// No dead letter with this id (it may have been redriven or discarded).
    #[error("no dead letter with id {0}; it may already have been redriven or discarded")]
    NotFound(u64),
    /// The dead letter is parked behind an earlier one of the same aggregate.
    #[error(
        "dead letter {id} is parked behind dead letter {head} (an earlier event of the same aggregate); redrive or discard {head} first, or redrive the whole consumer"
    )]
    NotHead {
        /// The dead letter asked for.
        id: u64,
        /// The dead letter that must go first.
        head: u64,
    },
    /// A stored dead letter lacks a header Sluice writes.
    #[error("dead letter {id} is malformed: {reason}")]
    Malformed {
        /// The dead letter.
        id: u64,
        /// What is missing or unreadable.
        reason: String,
    },
    /// No durable consumer or worker has this name.
    #[error("no consumer or worker named {0:?}; list the durable consumers to see which exist")]
    UnknownConsumer(String),
    /// A discard was asked for without a reason.
    #[error("a discard needs a reason (it is kept for audit)")]
    MissingReason,
    /// A dead letter could not be stored (the `DLQ` stream is missing, full,
    /// or refuses it): the message is neither applied nor dropped, and the
    /// consumer stops on its aggregate until the DLQ accepts it.
    #[error(
        "cannot dead-letter {subject} (stream sequence {sequence}) for {consumer}: {cause}; the consumer holds it and retries: check the DLQ stream (`nats stream info DLQ`: deleted, full or limited), free space or raise its limits"
    )]
    CannotDeadLetter {
        /// The consumer that failed on the message.
        consumer: String,
        /// Subject of the message.
        subject: String,
        /// Its stream sequence.
        sequence: u64,
        /// What the server or client said.
        cause: String,
    },
    /// A by-reference dead letter's original is no longer in its stream.
    #[error(
        "the original of a by-reference dead letter ({stream} sequence {sequence}) cannot be read: {cause}; it may have been removed from the log (limits or a purge), so only its headers are left"
    )]
    OriginalMissing {
        /// Stream named by the dead letter.
        stream: String,
        /// Sequence named by the dead letter.
        sequence: u64,
        /// Why the read failed.
        cause: String,
    },
    /// A JetStream or NATS request failed.
    #[error("NATS request failed while {action}: {message}")]
    Nats {
        /// What the runtime was doing.
        action: &'static str,
        /// The client's error text (logged; never parsed).
        message: String,
    },
}

impl Error {
    /// True when a dead letter could not be stored ([`Error::CannotDeadLetter`]).
    pub fn is_cannot_dead_letter(&self) -> bool {
        matches!(self, Error::CannotDeadLetter { .. })
    }

    /// Wraps a client error with what was being done.
    pub(crate) fn nats(action: &'static str, e: impl std::fmt::Display) -> Self {
        Error::Nats {
            action,
            message: e.to_string(),
        }
    }
}
