//! The one error type of the events crate.

use std::time::Duration;

/// What went wrong in the envelope, the store or the embedded server.
///
/// Each invalid-input case is its own variant so callers (and the workers'
/// dead-letter reasons) can tell them apart without reading text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A category or aggregate id is not a safe subject token.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidToken {
        /// Which token was checked (category, aggregate id, ...).
        what: &'static str,
        /// The rejected value (truncated).
        value: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A NATS subject is not `events.<category>.<id>`.
    #[error("subject {0:?} is not of the form events.<category>.<id> with valid tokens")]
    BadSubject(String),
    /// An event id is empty, too long or not printable ASCII.
    #[error("invalid event id {0:?}: use 1-128 printable ASCII characters, e.g. a UUIDv7")]
    InvalidEventId(String),
    /// A required CloudEvents attribute is absent.
    #[error("missing required CloudEvents attribute {0:?}")]
    MissingAttribute(&'static str),
    /// `specversion` is not `1.0`.
    #[error("unsupported CloudEvents specversion {0:?}: only \"1.0\" is accepted")]
    UnsupportedSpecVersion(String),
    /// `time` is not RFC 3339.
    #[error("invalid CloudEvents time {0:?}: use RFC 3339, e.g. 2026-01-01T00:00:00Z")]
    InvalidTime(String),
    /// An event type is empty or has characters outside `[A-Za-z0-9._-]`.
    #[error("invalid event type {0:?}: use a dotted name like ledger.account.opened.v1")]
    InvalidEventType(String),
    /// An attribute's value cannot be carried in a NATS header.
    #[error("invalid CloudEvents attribute {name}: {reason}")]
    InvalidAttribute {
        /// The attribute.
        name: &'static str,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A header value cannot be read as text.
    #[error("header {0:?} is not valid text")]
    InvalidHeader(String),
    /// The content type is neither JSON nor structured CloudEvents JSON.
    #[error(
        "unsupported content type {0:?}: use application/json (binary mode) or application/cloudevents+json (structured mode)"
    )]
    UnsupportedContentType(String),
    /// The data (or a structured event) is not well-formed JSON.
    #[error("event data is not valid JSON: {0}")]
    InvalidJson(String),
    /// The payload exceeds the configured limit.
    #[error(
        "payload of {size} bytes exceeds the limit of {limit} bytes; store large blobs elsewhere and reference them"
    )]
    PayloadTooLarge {
        /// Size of the rejected payload.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// An append was given no events.
    #[error("append needs at least one event")]
    EmptyAppend,
    /// An append carries more events than one atomic batch may hold.
    #[error("append of {count} events exceeds the atomic batch limit of {limit}")]
    TooManyEvents {
        /// Events in the append.
        count: usize,
        /// The batch limit.
        limit: usize,
    },
    /// Optimistic concurrency: the aggregate moved on since the caller read it.
    #[error("conflict on {stream}: expected version {expected}, actual {actual}; reload and retry")]
    Conflict {
        /// The aggregate.
        stream: String,
        /// The version the caller expected (0 = no stream).
        expected: u64,
        /// The aggregate's actual version (0 = no stream).
        actual: u64,
    },
    /// The server is older than Sluice needs.
    #[error(
        "nats-server {found} is too old: Sluice needs >= {required} (atomic batch publish, +TERM reasons, multi-filter consumers, sync_interval); run scripts/setup.sh or set SLUICE_NATS_SERVER_BIN"
    )]
    ServerTooOld {
        /// Version the server reported.
        found: String,
        /// Minimum version required.
        required: String,
    },
    /// The server has JetStream disabled.
    #[error("nats-server at {0} has JetStream disabled; start it with -js")]
    JetStreamDisabled(String),
    /// Could not connect to NATS.
    #[error(
        "cannot connect to NATS at {url}: {source}; check that a server runs there (start one, or point the URL at one that does) and the credentials/TLS settings"
    )]
    Connect {
        /// The URL tried.
        url: String,
        /// The client error.
        #[source]
        source: async_nats::ConnectError,
    },
    /// The server did not answer in time, even after retries.
    #[error("NATS did not answer within {0:?}; the server may be overloaded or unreachable")]
    Timeout(Duration),
    /// The stream exists with settings Sluice cannot use.
    #[error("stream {stream} is misconfigured: {reason}")]
    StreamMisconfigured {
        /// The stream name.
        stream: String,
        /// What is wrong.
        reason: String,
    },
    /// The stream could not be created, or updated to the settings Sluice
    /// relies on.
    #[error("stream {stream} is misconfigured: creating or updating it failed: {source}")]
    StreamSetup {
        /// The stream name.
        stream: String,
        /// The client error.
        #[source]
        source: async_nats::jetstream::context::CreateStreamError,
    },
    /// The server rejected an append for a reason other than a conflict.
    #[error("append rejected by the server (code {code}): {description}")]
    Rejected {
        /// JetStream API error code.
        code: u64,
        /// The server's description.
        description: String,
    },
    /// Appends arrive faster than the server takes them: the append queue
    /// stayed full for the whole wait. Nothing was written; retry later.
    #[error(
        "append queue full for {waited:?} ({capacity} appends waiting): the server is slower than the offered load; retry later"
    )]
    Overloaded {
        /// How long the caller waited for room.
        waited: Duration,
        /// The queue's capacity.
        capacity: usize,
    },
    /// An event id of the append already names another event: one on
    /// another aggregate, or on this one with another type or data. The
    /// server remembers ids for the stream's duplicate window, so this is
    /// told within that window; nothing was written.
    #[error(
        "event id {id:?} for {stream} is already used by {}: an id names one event, so a retry must repeat the same event on the same aggregate; give a new event a fresh id (nothing was written)",
        describe_existing(.existing_stream.as_deref(), *.existing_position)
    )]
    IdReused {
        /// The reused id.
        id: String,
        /// The aggregate the append was for.
        stream: String,
        /// The aggregate of the event that holds the id, when found.
        existing_stream: Option<String>,
        /// The position of the event that holds the id, when found.
        existing_position: Option<u64>,
    },
    /// Two events of one append carry the same id.
    #[error("event id {0:?} appears more than once in one append: every event needs its own id")]
    DuplicateEventId(String),
    /// A setting is out of its allowed range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A direct get (a read of stored messages by position or subject) failed.
    #[error("NATS request failed while reading the event stream with a direct get: {0}")]
    DirectGet(#[source] async_nats::jetstream::stream::DirectGetError),
    /// Reading the stream's info (its state, its head) failed.
    #[error("NATS request failed while reading the event stream's info: {0}")]
    StreamInfo(#[source] async_nats::jetstream::stream::InfoError),
    /// Looking up the stream failed.
    #[error("NATS request failed while looking up the event stream: {0}")]
    GetStream(#[source] async_nats::jetstream::context::GetStreamError),
    /// Creating a reader of the stream (an ordered consumer) failed.
    #[error("NATS request failed while creating a reader of the event stream: {0}")]
    CreateReader(#[source] async_nats::jetstream::stream::ConsumerError),
    /// A reader's feed could not be opened.
    #[error("NATS request failed while opening a reader of the event stream: {0}")]
    OpenReader(#[source] async_nats::jetstream::consumer::StreamError),
    /// A reader's feed failed while delivering messages.
    #[error("NATS request failed while reading from the event stream: {0}")]
    Read(#[source] async_nats::jetstream::consumer::pull::OrderedError),
    /// A delivered message carries no readable JetStream metadata (its
    /// position).
    #[error("NATS request failed: a delivered message has no JetStream metadata: {0}")]
    MessageInfo(#[source] async_nats::Error),
    /// Any other JetStream or NATS failure, with no client error behind it
    /// (a feed that ended, an answer that never came).
    #[error("NATS request failed: {0}")]
    Nats(String),
    /// Connection settings are invalid (missing files, conflicting options).
    #[error("invalid NATS connection settings: {0}")]
    Config(String),
    /// The embedded nats-server could not be started or stopped.
    #[error("embedded nats-server: {0}")]
    Embedded(String),
    /// Event data is well-formed JSON but not what its type says (a
    /// domain decoder's verdict).
    #[error("event data is invalid: {0}")]
    InvalidData(String),
    /// A declared schema does not compile (a bug of the domain declaring it).
    #[error("invalid schema for {event_type}: {reason}")]
    InvalidSchema {
        /// The event type it was declared for.
        event_type: String,
        /// Why it does not compile.
        reason: String,
    },
    /// The public append was asked to write to a category the platform owns.
    #[error(
        "category {category:?} is reserved for the platform (prefix {prefix:?}): its events are written by Sluice itself, never through the public append"
    )]
    ReservedCategory {
        /// The category asked for.
        category: String,
        /// The reserved prefix it falls under.
        prefix: String,
    },
    /// The category is declared, but not with this event type.
    #[error("category {category:?} declares no event type {event_type:?}; known: {}", known.join(", "))]
    UnknownEventType {
        /// The category.
        category: String,
        /// The type asked for.
        event_type: String,
        /// The types it declares.
        known: Vec<String>,
    },
    /// The data breaks its type's declared schema; nothing was written.
    #[error(
        "event {index} ({event_type}) for {stream} does not match its schema: {}",
        violations.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    SchemaViolation {
        /// The aggregate.
        stream: String,
        /// The event type.
        event_type: String,
        /// Which event of the append (0-based).
        index: usize,
        /// Every violation, with its JSON pointer.
        violations: Vec<crate::catalog::Violation>,
    },
    /// An event in the log cannot be read as what it claims to be. It was
    /// written around the checks (e.g. by a raw NATS client); voiding it
    /// makes every consumer skip it.
    #[error(
        "event at position {position} ({event_type} on {stream}) is invalid: {reason}; void it to let its aggregate load again"
    )]
    InvalidStoredEvent {
        /// Its position in the log.
        position: u64,
        /// Its aggregate (or subject).
        stream: String,
        /// Its type, as far as known.
        event_type: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An idempotency key was used before for another request (another
    /// resource, operation or body); nothing was done.
    #[error(
        "idempotency key {key:?} was already used for {first_use}: a key stands for one request (same resource, operation and body); use a new key for a new request (nothing was done)"
    )]
    IdempotencyKeyReused {
        /// The key.
        key: String,
        /// Its first use: operation, resource, request and time.
        first_use: String,
    },
    /// A request with this key is still running (a concurrent repeat); it
    /// either finishes or loses the key when its lease ends.
    #[error("a request with idempotency key {0:?} is still in progress; retry in a moment")]
    IdempotencyInProgress(String),
    /// The idempotency records could not be read or written.
    #[error("idempotency records ({bucket}): {0}", bucket = crate::IDEMPOTENCY_BUCKET)]
    Idempotency(String),
    /// No event is stored at that position.
    #[error("no event at position {0}")]
    NoSuchEvent(u64),
    /// The event at that position cannot be voided.
    #[error("the event at position {position} cannot be voided: {reason}")]
    NotVoidable {
        /// Its position.
        position: u64,
        /// Why not.
        reason: &'static str,
    },
}

impl Error {
    /// True for errors caused by the caller's input (fix the input, don't retry).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::InvalidToken { .. }
                | Error::BadSubject(_)
                | Error::InvalidEventId(_)
                | Error::MissingAttribute(_)
                | Error::UnsupportedSpecVersion(_)
                | Error::InvalidTime(_)
                | Error::InvalidEventType(_)
                | Error::InvalidAttribute { .. }
                | Error::InvalidHeader(_)
                | Error::UnsupportedContentType(_)
                | Error::InvalidJson(_)
                | Error::PayloadTooLarge { .. }
                | Error::EmptyAppend
                | Error::TooManyEvents { .. }
                | Error::DuplicateEventId(_)
                | Error::InvalidData(_)
                | Error::ReservedCategory { .. }
                | Error::UnknownEventType { .. }
                | Error::SchemaViolation { .. }
        )
    }

    /// True when the write was refused by the catalog (reserved category,
    /// unknown type, schema violation): a usage mistake, nothing written.
    pub fn is_refused_by_catalog(&self) -> bool {
        matches!(
            self,
            Error::ReservedCategory { .. }
                | Error::UnknownEventType { .. }
                | Error::SchemaViolation { .. }
        )
    }

    /// The position of the stored event this error is about, when a bad
    /// event in the log caused it (the operator's remedy: void it).
    pub fn stored_event_position(&self) -> Option<u64> {
        match self {
            Error::InvalidStoredEvent { position, .. } => Some(*position),
            _ => None,
        }
    }

    /// True for failures worth retrying later (timeouts, connection trouble).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Timeout(_)
                | Error::Nats(_)
                | Error::DirectGet(_)
                | Error::StreamInfo(_)
                | Error::GetStream(_)
                | Error::CreateReader(_)
                | Error::OpenReader(_)
                | Error::Read(_)
                | Error::MessageInfo(_)
                | Error::Connect { .. }
                | Error::Overloaded { .. }
        )
    }

    /// True for an optimistic-concurrency conflict.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }

    /// True when an event id of the append already names another event
    /// ([`Error::IdReused`]): a caller's mistake, never worth retrying as is.
    pub fn is_id_reused(&self) -> bool {
        matches!(self, Error::IdReused { .. })
    }
}

/// Where the event holding a reused id is, for [`Error::IdReused`].
fn describe_existing(stream: Option<&str>, position: Option<u64>) -> String {
    match (stream, position) {
        (Some(s), Some(p)) => format!("the event at position {p} on {s}"),
        (None, Some(p)) => format!("the event at position {p}"),
        _ => "another event within the duplicate window".to_owned(),
    }
}
