//! What a handler sees and how it reports failure.

use std::future::Future;

use sluice_events::{Envelope, StreamId};

/// One event handed to a handler.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The aggregate the event belongs to.
    pub stream_id: StreamId,
    /// The event's stream sequence in `EVENTS` (its global position). Stable
    /// across redeliveries and redrives: a good idempotency key, like the
    /// event id.
    pub sequence: u64,
    /// The decoded CloudEvent.
    pub envelope: Envelope,
    /// Which attempt this is for this message (1 for the first delivery).
    pub attempt: u64,
    /// True when an operator redrove the event from the dead-letter stream.
    pub redriven: bool,
}

/// A boxed error a handler may carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How a handler failed. The handler classifies; the runtime decides.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying later (database down, timeout, conflict).
    #[error("transient: {0}")]
    Transient(BoxError),
    /// Retrying cannot help (unknown event type, invalid data, rejected).
    #[error("permanent: {0}")]
    Permanent(BoxError),
}

impl HandlerError {
    /// A transient failure from anything printable.
    pub fn transient(e: impl Into<BoxError>) -> Self {
        HandlerError::Transient(e.into())
    }

    /// A permanent failure from anything printable.
    pub fn permanent(e: impl Into<BoxError>) -> Self {
        HandlerError::Permanent(e.into())
    }

    /// The permanent failure for an event type this handler does not know.
    pub fn unknown_type(envelope: &Envelope) -> Self {
        HandlerError::Permanent(format!("unknown event type {:?}", envelope.event_type).into())
    }
}

/// What a handler returns.
pub type HandlerResult = Result<(), HandlerError>;

/// An async function of one delivery. Must be idempotent (keyed by the event
/// id or the stream sequence): delivery is at least once.
pub trait Handler: Send + Sync + 'static {
    /// Handles one delivery.
    fn handle(&self, delivery: Delivery) -> impl Future<Output = HandlerResult> + Send;
}

impl<F, Fut> Handler for F
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send,
{
    fn handle(&self, delivery: Delivery) -> impl Future<Output = HandlerResult> + Send {
        self(delivery)
    }
}
