//! CloudEvents 1.0 over NATS: binary content mode on output, binary or
//! structured mode on input.

use async_nats::HeaderMap;
use async_nats::header::HeaderName;
use bytes::Bytes;
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::Error;
use crate::ids::EventId;

/// The only CloudEvents version Sluice speaks.
pub const SPEC_VERSION: &str = "1.0";
/// Content type of binary-mode events (the body is the event data).
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// Content type of structured-mode events (the body is the whole event).
pub const CONTENT_TYPE_STRUCTURED: &str = "application/cloudevents+json";
/// Default payload limit: well under nats-server's 1 MiB `max_payload`, so
/// headers and batch overhead always fit.
pub const DEFAULT_MAX_PAYLOAD: usize = 256 * 1024;
/// Source used when a producer does not name one.
pub(crate) const DEFAULT_SOURCE: &str = "urn:sluice";

pub(crate) const H_SPECVERSION: &str = "ce-specversion";
pub(crate) const H_ID: &str = "ce-id";
pub(crate) const H_SOURCE: &str = "ce-source";
pub(crate) const H_TYPE: &str = "ce-type";
pub(crate) const H_TIME: &str = "ce-time";
pub(crate) const H_SUBJECT: &str = "ce-subject";
pub(crate) const H_CORRELATION: &str = "ce-correlationid";
pub(crate) const H_CAUSATION: &str = "ce-causationid";
pub(crate) const H_TRACEPARENT: &str = "ce-traceparent";
pub(crate) const H_CONTENT_TYPE: &str = "Content-Type";
pub(crate) const H_MSG_ID: &str = "Nats-Msg-Id";

/// An event a producer wants to append; the store adds the aggregate id.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// CloudEvents `id`; also the dedup id of the append.
    pub id: EventId,
    /// CloudEvents `type`, a stable wire name such as `ledger.account.opened.v1`.
    pub event_type: String,
    /// CloudEvents `source`.
    pub source: String,
    /// CloudEvents `time`.
    pub time: OffsetDateTime,
    /// The event data, well-formed JSON.
    pub data: Bytes,
    /// Correlation id extension (the flow this event belongs to).
    pub correlation_id: Option<String>,
    /// Causation id extension (the message that caused this event).
    pub causation_id: Option<String>,
    /// W3C trace context extension.
    pub traceparent: Option<String>,
}

impl NewEvent {
    /// An event with a fresh UUIDv7 id, the current time and the default source.
    pub fn new(event_type: impl Into<String>, data: impl Into<Bytes>) -> Self {
        Self {
            id: EventId::new(),
            event_type: event_type.into(),
            source: DEFAULT_SOURCE.to_owned(),
            time: OffsetDateTime::now_utc(),
            data: data.into(),
            correlation_id: None,
            causation_id: None,
            traceparent: None,
        }
    }

    /// An event whose data is a serialisable value.
    pub fn json<T: serde::Serialize>(
        event_type: impl Into<String>,
        data: &T,
    ) -> Result<Self, Error> {
        let data = serde_json::to_vec(data).map_err(|e| Error::InvalidJson(e.to_string()))?;
        Ok(Self::new(event_type, data))
    }

    /// Sets the id (for retries that must dedup, or ids chosen upstream).
    pub fn with_id(mut self, id: EventId) -> Self {
        self.id = id;
        self
    }

    /// Sets the source.
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id.
    pub fn with_causation_id(mut self, id: impl Into<String>) -> Self {
        self.causation_id = Some(id.into());
        self
    }

    /// Checks everything that can be checked before the event reaches NATS.
    pub fn validate(&self, max_payload: usize) -> Result<(), Error> {
        validate_type(&self.event_type)?;
        if self.source.is_empty() {
            return Err(Error::MissingAttribute("source"));
        }
        // Header values end at a line break, so one inside would cut the
        // attribute short (and async-nats refuses it with a panic).
        for (name, value) in [
            ("source", Some(&self.source)),
            ("correlationid", self.correlation_id.as_ref()),
            ("causationid", self.causation_id.as_ref()),
            ("traceparent", self.traceparent.as_ref()),
        ] {
            if let Some(v) = value
                && v.bytes().any(|b| b == b'\r' || b == b'\n')
            {
                return Err(Error::InvalidAttribute {
                    name,
                    reason: "contains a line break (CR or LF), which NATS headers cannot carry",
                });
            }
        }
        if self.data.len() > max_payload {
            return Err(Error::PayloadTooLarge {
                size: self.data.len(),
                limit: max_payload,
            });
        }
        validate_json(&self.data)
    }

    /// The binary-mode headers, in a fixed order (the wire format the golden
    /// test pins).
    pub fn header_pairs(&self, aggregate_id: &str) -> Vec<(&'static str, String)> {
        let mut h = vec![
            (H_SPECVERSION, SPEC_VERSION.to_owned()),
            (H_ID, self.id.to_string()),
            (H_SOURCE, self.source.clone()),
            (H_TYPE, self.event_type.clone()),
            (H_TIME, format_time(self.time)),
            (H_SUBJECT, aggregate_id.to_owned()),
            (H_CONTENT_TYPE, CONTENT_TYPE_JSON.to_owned()),
        ];
        let ext = [
            (H_CORRELATION, &self.correlation_id),
            (H_CAUSATION, &self.causation_id),
            (H_TRACEPARENT, &self.traceparent),
        ];
        for (name, value) in ext {
            if let Some(v) = value {
                h.push((name, v.clone()));
            }
        }
        h.push((H_MSG_ID, self.id.to_string()));
        h
    }

    /// The binary-mode headers as a NATS header map, with the same names and
    /// values as [`header_pairs`](Self::header_pairs). Built straight from
    /// the event with static names, since every append attempt builds one.
    pub fn headers(&self, aggregate_id: &str) -> HeaderMap {
        let id = self.id.as_str();
        let mut map = HeaderMap::new();
        map.insert(HeaderName::from_static(H_SPECVERSION), SPEC_VERSION);
        map.insert(HeaderName::from_static(H_ID), id);
        map.insert(HeaderName::from_static(H_SOURCE), self.source.as_str());
        map.insert(HeaderName::from_static(H_TYPE), self.event_type.as_str());
        map.insert(HeaderName::from_static(H_TIME), format_time(self.time));
        map.insert(HeaderName::from_static(H_SUBJECT), aggregate_id);
        map.insert(HeaderName::from_static(H_CONTENT_TYPE), CONTENT_TYPE_JSON);
        for (name, value) in self.extensions() {
            if let Some(v) = value {
                map.insert(HeaderName::from_static(name), v.as_str());
            }
        }
        map.insert(HeaderName::from_static(H_MSG_ID), id);
        map
    }

    /// Bytes the headers take on the wire (`name: value\r\n` each), without
    /// building them.
    pub(crate) fn headers_len(&self, aggregate_id: &str) -> usize {
        const TIME_LEN: usize = "2026-01-01T00:00:00.000000000Z".len();
        let id = self.id.as_str().len();
        let fixed = [
            (H_SPECVERSION, SPEC_VERSION.len()),
            (H_ID, id),
            (H_SOURCE, self.source.len()),
            (H_TYPE, self.event_type.len()),
            (H_TIME, TIME_LEN),
            (H_SUBJECT, aggregate_id.len()),
            (H_CONTENT_TYPE, CONTENT_TYPE_JSON.len()),
            (H_MSG_ID, id),
        ];
        let ext = self
            .extensions()
            .into_iter()
            .filter_map(|(name, v)| v.map(|v| (name, v.len())));
        fixed
            .into_iter()
            .chain(ext)
            .map(|(name, len)| name.len() + len + 4)
            .sum()
    }

    fn extensions(&self) -> [(&'static str, Option<&String>); 3] {
        [
            (H_CORRELATION, self.correlation_id.as_ref()),
            (H_CAUSATION, self.causation_id.as_ref()),
            (H_TRACEPARENT, self.traceparent.as_ref()),
        ]
    }
}

fn format_time(t: OffsetDateTime) -> String {
    // Rfc3339 formatting only fails for years outside 0..=9999.
    t.format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

fn validate_type(t: &str) -> Result<(), Error> {
    let ok = !t.is_empty()
        && t.len() <= 256
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidEventType(t.chars().take(140).collect()))
    }
}

fn validate_json(data: &[u8]) -> Result<(), Error> {
    serde_json::from_slice::<serde::de::IgnoredAny>(data)
        .map(|_| ())
        .map_err(|e| Error::InvalidJson(e.to_string()))
}

/// A decoded CloudEvent as read from NATS.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// CloudEvents `id`.
    pub id: EventId,
    /// CloudEvents `type`.
    pub event_type: String,
    /// CloudEvents `source`.
    pub source: String,
    /// CloudEvents `time`, when the producer set one.
    pub time: Option<OffsetDateTime>,
    /// CloudEvents `subject` (the aggregate id), when the producer set one.
    pub subject: Option<String>,
    /// The event data (JSON).
    pub data: Bytes,
    /// Correlation id extension.
    pub correlation_id: Option<String>,
    /// Causation id extension.
    pub causation_id: Option<String>,
    /// W3C trace context extension.
    pub traceparent: Option<String>,
}

impl Envelope {
    /// Decodes a NATS message in binary or structured content mode.
    ///
    /// Every contract violation is a distinct [`Error`] variant, so a consumer
    /// can dead-letter it with a precise reason.
    /// The payload is shared, not copied, into the envelope's data.
    pub fn decode(
        headers: Option<&HeaderMap>,
        payload: &Bytes,
        max_payload: usize,
    ) -> Result<Self, Error> {
        if payload.len() > max_payload {
            return Err(Error::PayloadTooLarge {
                size: payload.len(),
                limit: max_payload,
            });
        }
        // Static names: a `&str` lookup would allocate a header name each time.
        let get = |name: &'static str| -> Result<Option<String>, Error> {
            match headers.and_then(|h| h.get(HeaderName::from_static(name))) {
                None => Ok(None),
                Some(v) => Ok(Some(v.as_str().to_owned())),
            }
        };
        let content_type = get(H_CONTENT_TYPE)?;
        let base = content_type.as_deref().map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
        match base.as_deref() {
            Some(CONTENT_TYPE_STRUCTURED) => Self::decode_structured(payload),
            Some(CONTENT_TYPE_JSON) | None => {
                let required = |name: &'static str, attr: &'static str| -> Result<String, Error> {
                    get(name)?
                        .filter(|v| !v.is_empty())
                        .ok_or(Error::MissingAttribute(attr))
                };
                let spec = required(H_SPECVERSION, "specversion")?;
                if spec != SPEC_VERSION {
                    return Err(Error::UnsupportedSpecVersion(spec));
                }
                let id = EventId::parse(&required(H_ID, "id")?)?;
                let source = required(H_SOURCE, "source")?;
                let event_type = required(H_TYPE, "type")?;
                validate_type(&event_type)?;
                let time = get(H_TIME)?.map(|t| parse_time(&t)).transpose()?;
                validate_json(payload)?;
                Ok(Self {
                    id,
                    event_type,
                    source,
                    time,
                    subject: get(H_SUBJECT)?,
                    data: payload.clone(),
                    correlation_id: get(H_CORRELATION)?,
                    causation_id: get(H_CAUSATION)?,
                    traceparent: get(H_TRACEPARENT)?,
                })
            }
            Some(_) => Err(Error::UnsupportedContentType(
                content_type.unwrap_or_default(),
            )),
        }
    }

    fn decode_structured(payload: &[u8]) -> Result<Self, Error> {
        #[derive(Deserialize)]
        struct Structured {
            specversion: Option<String>,
            id: Option<String>,
            source: Option<String>,
            #[serde(rename = "type")]
            event_type: Option<String>,
            time: Option<String>,
            subject: Option<String>,
            datacontenttype: Option<String>,
            data: Option<Box<serde_json::value::RawValue>>,
            correlationid: Option<String>,
            causationid: Option<String>,
            traceparent: Option<String>,
        }
        let s: Structured =
            serde_json::from_slice(payload).map_err(|e| Error::InvalidJson(e.to_string()))?;
        let spec = s
            .specversion
            .ok_or(Error::MissingAttribute("specversion"))?;
        if spec != SPEC_VERSION {
            return Err(Error::UnsupportedSpecVersion(spec));
        }
        let id = EventId::parse(&s.id.ok_or(Error::MissingAttribute("id"))?)?;
        let source = s
            .source
            .filter(|v| !v.is_empty())
            .ok_or(Error::MissingAttribute("source"))?;
        let event_type = s.event_type.ok_or(Error::MissingAttribute("type"))?;
        validate_type(&event_type)?;
        if let Some(ct) = s.datacontenttype.as_deref()
            && ct != CONTENT_TYPE_JSON
        {
            return Err(Error::UnsupportedContentType(ct.to_owned()));
        }
        let data = s
            .data
            .map(|raw| Bytes::copy_from_slice(raw.get().as_bytes()))
            .unwrap_or_else(|| Bytes::from_static(b"null"));
        Ok(Self {
            id,
            event_type,
            source,
            time: s.time.map(|t| parse_time(&t)).transpose()?,
            subject: s.subject,
            data,
            correlation_id: s.correlationid,
            causation_id: s.causationid,
            traceparent: s.traceparent,
        })
    }

    /// Deserialises the data into a typed value.
    pub fn data_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.data).map_err(|e| Error::InvalidJson(e.to_string()))
    }

    /// The time formatted as RFC 3339, if set.
    pub fn time_rfc3339(&self) -> Option<String> {
        self.time.map(format_time)
    }
}

fn parse_time(t: &str) -> Result<OffsetDateTime, Error> {
    OffsetDateTime::parse(t, &Rfc3339).map_err(|_| Error::InvalidTime(t.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn sample() -> NewEvent {
        NewEvent {
            id: EventId::parse("0193f2a0-7c1e-7d3a-9b2c-4f5e6a7b8c9d").unwrap(),
            event_type: "ledger.account.deposited.v1".into(),
            source: "urn:sluice:test".into(),
            time: datetime!(2026-01-02 03:04:05.123 UTC),
            data: Bytes::from_static(br#"{"amount":1250}"#),
            correlation_id: Some("corr-1".into()),
            causation_id: None,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        }
    }

    /// Pins the wire format byte for byte: changing it breaks every consumer.
    #[test]
    fn golden_binary_mode_wire_format() {
        let ev = sample();
        let rendered: String = ev
            .header_pairs("acc-42")
            .iter()
            .map(|(k, v)| format!("{k}: {v}\n"))
            .collect();
        let golden = "\
ce-specversion: 1.0
ce-id: 0193f2a0-7c1e-7d3a-9b2c-4f5e6a7b8c9d
ce-source: urn:sluice:test
ce-type: ledger.account.deposited.v1
ce-time: 2026-01-02T03:04:05.123Z
ce-subject: acc-42
Content-Type: application/json
ce-correlationid: corr-1
ce-traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01
Nats-Msg-Id: 0193f2a0-7c1e-7d3a-9b2c-4f5e6a7b8c9d
";
        assert_eq!(rendered, golden);
        assert_eq!(&ev.data[..], br#"{"amount":1250}"#);
    }

    #[test]
    fn binary_round_trip() {
        let ev = sample();
        let env =
            Envelope::decode(Some(&ev.headers("acc-42")), &ev.data, DEFAULT_MAX_PAYLOAD).unwrap();
        assert_eq!(env.id, ev.id);
        assert_eq!(env.event_type, ev.event_type);
        assert_eq!(env.time, Some(ev.time));
        assert_eq!(env.subject.as_deref(), Some("acc-42"));
        assert_eq!(env.correlation_id.as_deref(), Some("corr-1"));
        assert_eq!(env.data, ev.data);
    }

    #[test]
    fn structured_mode_is_accepted() {
        let mut h = HeaderMap::new();
        h.insert(H_CONTENT_TYPE, CONTENT_TYPE_STRUCTURED);
        let body = br#"{"specversion":"1.0","id":"e-1","source":"go-svc","type":"ledger.account.opened.v1","time":"2026-01-01T00:00:00Z","subject":"acc-1","datacontenttype":"application/json","data":{"owner":"ann","currency":"EUR"}}"#;
        let env =
            Envelope::decode(Some(&h), &Bytes::from_static(body), DEFAULT_MAX_PAYLOAD).unwrap();
        assert_eq!(env.id.as_str(), "e-1");
        assert_eq!(&env.data[..], br#"{"owner":"ann","currency":"EUR"}"#);
    }

    #[test]
    fn each_violation_is_its_own_error() {
        let ev = sample();
        let full = ev.headers("acc-42");
        for (drop, attr) in [
            (H_SPECVERSION, "specversion"),
            (H_ID, "id"),
            (H_SOURCE, "source"),
            (H_TYPE, "type"),
        ] {
            let mut h = HeaderMap::new();
            for (k, v) in ev.header_pairs("acc-42") {
                if k != drop {
                    h.insert(k, v.as_str());
                }
            }
            let err = Envelope::decode(Some(&h), &ev.data, DEFAULT_MAX_PAYLOAD).unwrap_err();
            assert!(
                matches!(err, Error::MissingAttribute(a) if a == attr),
                "{err}"
            );
        }
        let err = Envelope::decode(
            Some(&full),
            &Bytes::from_static(b"{not json"),
            DEFAULT_MAX_PAYLOAD,
        )
        .unwrap_err();
        assert!(matches!(err, Error::InvalidJson(_)));
        let err = Envelope::decode(Some(&full), &Bytes::from(vec![b' '; 64]), 32).unwrap_err();
        assert!(matches!(
            err,
            Error::PayloadTooLarge {
                size: 64,
                limit: 32
            }
        ));
        let mut h = full.clone();
        h.insert(H_TIME, "yesterday");
        assert!(matches!(
            Envelope::decode(Some(&h), &ev.data, DEFAULT_MAX_PAYLOAD),
            Err(Error::InvalidTime(_))
        ));
        let mut h = full.clone();
        h.insert(H_SPECVERSION, "0.3");
        assert!(matches!(
            Envelope::decode(Some(&h), &ev.data, DEFAULT_MAX_PAYLOAD),
            Err(Error::UnsupportedSpecVersion(_))
        ));
        let mut h = full.clone();
        h.insert(H_CONTENT_TYPE, "text/plain");
        assert!(matches!(
            Envelope::decode(Some(&h), &ev.data, DEFAULT_MAX_PAYLOAD),
            Err(Error::UnsupportedContentType(_))
        ));
        assert!(matches!(
            Envelope::decode(None, &ev.data, DEFAULT_MAX_PAYLOAD),
            Err(Error::MissingAttribute("specversion"))
        ));
    }

    #[test]
    fn new_event_validation() {
        assert!(matches!(
            NewEvent::new("a b", "{}").validate(DEFAULT_MAX_PAYLOAD),
            Err(Error::InvalidEventType(_))
        ));
        assert!(matches!(
            NewEvent::new("t.v1", "{").validate(DEFAULT_MAX_PAYLOAD),
            Err(Error::InvalidJson(_))
        ));
        assert!(matches!(
            NewEvent::new("t.v1", vec![b'1'; 100]).validate(10),
            Err(Error::PayloadTooLarge { .. })
        ));
        assert!(
            NewEvent::new("t.v1", "{}")
                .validate(DEFAULT_MAX_PAYLOAD)
                .is_ok()
        );
    }

    #[test]
    fn line_breaks_in_attributes_are_refused_before_nats() {
        for ev in [
            NewEvent::new("t.v1", "{}").with_source("urn:a\nb"),
            NewEvent::new("t.v1", "{}").with_correlation_id("c\r1"),
            NewEvent::new("t.v1", "{}").with_causation_id("c\n"),
        ] {
            let err = ev.validate(DEFAULT_MAX_PAYLOAD).unwrap_err();
            assert!(matches!(err, Error::InvalidAttribute { .. }), "{err}");
            assert!(err.is_invalid_input());
            assert!(err.to_string().contains("line break"), "{err}");
        }
    }

    /// The map an append sends holds exactly the pinned pairs.
    #[test]
    fn header_map_matches_the_pinned_pairs() {
        let mut bare = sample();
        bare.correlation_id = None;
        bare.traceparent = None;
        for ev in [sample(), bare] {
            let map = ev.headers("acc-42");
            let pairs = ev.header_pairs("acc-42");
            assert_eq!(map.len(), pairs.len());
            for (k, v) in &pairs {
                assert_eq!(
                    map.get(*k).map(async_nats::HeaderValue::as_str),
                    Some(v.as_str()),
                    "{k}"
                );
            }
            // The estimate allows for the longest time format.
            let exact: usize = pairs.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
            let estimate = ev.headers_len("acc-42");
            assert!(
                estimate >= exact && estimate <= exact + 10,
                "{estimate} vs {exact}"
            );
        }
    }
}
