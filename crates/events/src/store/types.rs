//! The store's vocabulary: what an append expects and what it returns, and
//! events as stored.

use crate::envelope::Envelope;
use crate::error::Error;
use crate::ids::StreamId;

/// What the caller believes about the aggregate's current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// No check: append whatever the version is.
    Any,
    /// The aggregate must have no events yet.
    NoStream,
    /// The aggregate's last event must be at this stream sequence.
    Exact(u64),
}

impl ExpectedVersion {
    /// The version as the server checks it (0 = no stream), if any check.
    pub(crate) fn as_sequence(self) -> Option<u64> {
        match self {
            ExpectedVersion::Any => None,
            ExpectedVersion::NoStream => Some(0),
            ExpectedVersion::Exact(v) => Some(v),
        }
    }

    /// `NoStream` for version 0, else `Exact(version)`.
    pub fn from_version(version: u64) -> Self {
        if version == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(version)
        }
    }
}

/// Where an append landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendResult {
    /// The aggregate's new version (stream sequence of its last event).
    pub version: u64,
    /// Global positions (stream sequences) of the appended events, in order.
    pub positions: Vec<u64>,
    /// True when the events were already there (a retry of an append that
    /// had landed); nothing new was written. Only ever true when the stored
    /// events are these very events: same ids, same aggregate, same types
    /// and data; an id that names another event is [`Error::IdReused`].
    pub deduplicated: bool,
}

/// An event as stored: envelope plus where it lives.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    /// The aggregate it belongs to.
    pub stream_id: StreamId,
    /// Global position (stream sequence); also the aggregate's version after it.
    pub position: u64,
    /// The CloudEvent.
    pub envelope: Envelope,
}

/// An aggregate's events as consumers fold them: voided events left out,
/// the version still the position of its last event (voided or not, since
/// that is what an optimistic append is checked against).
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    /// Its events that are not voided, in order.
    pub events: Vec<RecordedEvent>,
    /// The aggregate's version (0 = no events).
    pub version: u64,
    /// Positions of its voided events.
    pub voided: Vec<u64>,
}

impl RecordedEvent {
    /// The error for this stored event not reading as what it claims to be
    /// (`reason`: the decoder's verdict).
    pub fn invalid(&self, reason: impl std::fmt::Display) -> Error {
        Error::InvalidStoredEvent {
            position: self.position,
            stream: self.stream_id.to_string(),
            event_type: self.envelope.event_type.clone(),
            reason: reason.to_string(),
        }
    }

    /// A decoder's verdict on this event, its error turned into
    /// [`Error::InvalidStoredEvent`] naming the position.
    pub fn decoded<T>(&self, decoded: Result<T, Error>) -> Result<T, Error> {
        decoded.map_err(|e| match e {
            Error::InvalidData(reason) => self.invalid(reason),
            e @ Error::InvalidStoredEvent { .. } => e,
            other => self.invalid(other),
        })
    }
}
