//! Voiding: the remedy for a bad event that reached the log anyway (any
//! NATS client with publish rights can write around the public append's
//! checks).
//!
//! The log is append-only, so a void is an event of its own: an operator's
//! audited record on `events.sluice-void.<position>` (type
//! [`VOIDED`], data `{position, stream, type, id, reason}`), appended once per
//! position (expected version "no stream", event id `sluice-void-<position>`):
//! voiding twice answers with the first void. Every consumer skips voided
//! events: aggregate loads ([`EventStore::history`], [`crate::load`]),
//! projections and workers (through [`crate::Voided`], the store's voided
//! set, which learns of a void this process appends at once).

use async_nats::jetstream::stream::DirectGetErrorKind;
use serde::{Deserialize, Serialize};

use crate::envelope::{H_ID, H_TYPE, NewEvent};
use crate::error::Error;
use crate::ids::{EventId, StreamId};
use crate::{EventStore, ExpectedVersion, VOID_CATEGORY};

/// Wire name of a void record.
pub const VOIDED: &str = "sluice.event.voided.v1";

/// A void: which event, what it was, why. Also the record's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Voiding {
    /// Position of the voided event.
    pub position: u64,
    /// Its aggregate as `<category>/<id>` (or its raw subject).
    pub stream: String,
    /// Its `ce-type`, when it had one.
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// Its `ce-id`, when it had one.
    pub id: Option<String>,
    /// The operator's reason (audit).
    pub reason: String,
    /// Position of the void record itself.
    #[serde(default)]
    pub void_position: u64,
}

impl EventStore {
    /// Voids the event at `position`: appends the audited void record
    /// `events.sluice-void.<position>` (once; a second void answers with the
    /// first). Refuses unknown positions ([`Error::NoSuchEvent`]) and void
    /// records ([`Error::NotVoidable`]).
    pub async fn void(&self, position: u64, reason: &str) -> Result<Voiding, Error> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(Error::NotVoidable {
                position,
                reason: "a reason is required (it is kept for audit)",
            });
        }
        if let Some(existing) = self.voiding(position).await? {
            return Ok(existing);
        }
        let cfg = self.config();
        let stream = self
            .jetstream()
            .get_stream_no_info(&cfg.stream)
            .await
            .map_err(Error::GetStream)?;
        let msg = match stream.direct_get(position).await {
            Ok(m) => m,
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => {
                return Err(Error::NoSuchEvent(position));
            }
            Err(e) => return Err(Error::DirectGet(e)),
        };
        let target = match StreamId::from_subject(&cfg.subject_prefix, &msg.subject) {
            Ok(id) if id.category() == VOID_CATEGORY => {
                return Err(Error::NotVoidable {
                    position,
                    reason: "it is a void record itself",
                });
            }
            Ok(id) => id.to_string(),
            Err(_) => msg.subject.to_string(),
        };
        let header = |name: &str| msg.headers.get(name).map(|v| v.as_str().to_owned());
        let mut record = Voiding {
            position,
            stream: target,
            event_type: header(H_TYPE),
            id: header(H_ID),
            reason: reason.chars().take(1000).collect(),
            void_position: 0,
        };
        let data = serde_json::json!({
            "position": record.position,
            "stream": record.stream,
            "type": record.event_type,
            "id": record.id,
            "reason": record.reason,
        });
        let event = NewEvent::json(VOIDED, &data)?
            .with_id(EventId::parse(&format!("sluice-void-{position}"))?)
            .with_source("urn:sluice:void");
        let void_stream = StreamId::new(VOID_CATEGORY, position.to_string())?;
        match self
            .append(&void_stream, ExpectedVersion::NoStream, vec![event])
            .await
        {
            Ok(r) if !r.deduplicated => {
                record.void_position = r.version;
                tracing::warn!(position, stream = %record.stream, reason = %record.reason, "event voided");
            }
            // Someone voided it meanwhile: theirs is the answer.
            Ok(_) => {
                return self
                    .voiding(position)
                    .await?
                    .ok_or(Error::NoSuchEvent(position));
            }
            Err(e) if e.is_conflict() => {
                return self
                    .voiding(position)
                    .await?
                    .ok_or(Error::NoSuchEvent(position));
            }
            Err(e) => return Err(e),
        }
        Ok(record)
    }

    /// The void of the event at `position`, if it was voided.
    pub async fn voiding(&self, position: u64) -> Result<Option<Voiding>, Error> {
        let cfg = self.config();
        let subject = format!("{}.{VOID_CATEGORY}.{position}", cfg.subject_prefix);
        let stream = self
            .jetstream()
            .get_stream_no_info(&cfg.stream)
            .await
            .map_err(Error::GetStream)?;
        match stream.direct_get_first_for_subject(subject).await {
            Ok(m) => {
                let mut v: Voiding = serde_json::from_slice(&m.payload).map_err(|e| {
                    Error::InvalidJson(format!("void record at {}: {e}", m.sequence))
                })?;
                v.void_position = m.sequence;
                Ok(Some(v))
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::DirectGet(e)),
        }
    }
}
