//! Validated identifiers: aggregate stream ids (subject tokens) and event ids.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// Longest allowed subject token (category or aggregate id).
const MAX_TOKEN_LEN: usize = 128;
/// Longest allowed event id; it doubles as the `Nats-Msg-Id` header value.
const MAX_EVENT_ID_LEN: usize = 128;

/// Checks one subject token: `[A-Za-z0-9_-]{1,128}`, so user input never
/// becomes a wildcard (`*`, `>`) or an extra subject level (`.`).
pub fn validate_token(what: &'static str, value: &str) -> Result<(), Error> {
    let reason = if value.is_empty() {
        Some("it is empty")
    } else if value.len() > MAX_TOKEN_LEN {
        Some("it is longer than 128 characters")
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Some("only letters, digits, '_' and '-' are allowed (no '.', '*', '>', spaces)")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidToken {
            what,
            value: value.chars().take(140).collect(),
            reason,
        }),
    }
}

/// One aggregate instance: its events live on `events.<category>.<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId {
    category: String,
    id: String,
}

impl StreamId {
    /// Builds a stream id after validating both tokens.
    pub fn new(category: impl Into<String>, id: impl Into<String>) -> Result<Self, Error> {
        let (category, id) = (category.into(), id.into());
        validate_token("category", &category)?;
        validate_token("aggregate id", &id)?;
        Ok(Self { category, id })
    }

    /// Parses a NATS subject `<prefix>.<category>.<id>`.
    pub fn from_subject(prefix: &str, subject: &str) -> Result<Self, Error> {
        let rest = subject
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('.'))
            .ok_or_else(|| Error::BadSubject(subject.to_owned()))?;
        let (category, id) = rest
            .split_once('.')
            .ok_or_else(|| Error::BadSubject(subject.to_owned()))?;
        Self::new(category, id).map_err(|_| Error::BadSubject(subject.to_owned()))
    }

    /// The aggregate category, e.g. `account`.
    pub fn category(&self) -> &str {
        &self.category
    }

    /// The aggregate id within its category, e.g. `acc-42`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The NATS subject this aggregate's events live on.
    pub fn subject(&self, prefix: &str) -> String {
        format!("{prefix}.{}.{}", self.category, self.id)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.category, self.id)
    }
}

impl FromStr for StreamId {
    type Err = Error;

    /// Parses the CLI form `<category>/<id>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (category, id) = s.split_once('/').ok_or(Error::InvalidToken {
            what: "stream id",
            value: s.chars().take(140).collect(),
            reason: "write it as <category>/<id>, e.g. account/acc-42",
        })?;
        Self::new(category, id)
    }
}

/// A CloudEvents `id`; UUIDv7 when Sluice makes it, any printable token from
/// other producers. It is also the `Nats-Msg-Id` the server dedups on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(String);

impl EventId {
    /// A fresh, time-ordered UUIDv7 id.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// Validates an id received from elsewhere.
    pub fn parse(value: &str) -> Result<Self, Error> {
        if value.is_empty()
            || value.len() > MAX_EVENT_ID_LEN
            || !value.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(Error::InvalidEventId(value.chars().take(140).collect()));
        }
        Ok(Self(value.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_reject_wildcards_dots_spaces_and_length() {
        for bad in ["", "a.b", "*", ">", "a b", "é", &"x".repeat(129)] {
            let err = StreamId::new("account", bad).unwrap_err();
            assert!(matches!(err, Error::InvalidToken { .. }), "{bad:?}");
        }
        assert!(StreamId::new("account", "x".repeat(128)).is_ok());
        assert!(StreamId::new("acc_ount-1", "A-9_z").is_ok());
    }

    #[test]
    fn parses_cli_and_subject_forms() {
        let s: StreamId = "account/acc-42".parse().unwrap();
        assert_eq!(s.subject("events"), "events.account.acc-42");
        assert_eq!(
            StreamId::from_subject("events", "events.account.acc-42").unwrap(),
            s
        );
        assert!("account".parse::<StreamId>().is_err());
        assert!(StreamId::from_subject("events", "events.account").is_err());
        assert!(StreamId::from_subject("events", "events.a.b.c").is_err());
    }

    #[test]
    fn event_ids_are_uuid_v7_and_validated() {
        let id = EventId::new();
        let uuid = uuid::Uuid::parse_str(id.as_str()).unwrap();
        assert_eq!(uuid.get_version_num(), 7);
        assert!(EventId::parse("").is_err());
        assert!(EventId::parse("has space").is_err());
        assert!(EventId::parse("order-1").is_ok());
    }
}
