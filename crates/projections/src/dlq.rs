//! Dead letters in the contract's format: stream `DLQ`, subject
//! `dlq.<consumer>.<category>`, the original body and headers plus the
//! `Sluice-Dlq-*` headers, deduplicated by `<stream>:<consumer>:<seq>`.
//!
//! The header names and stream settings are the workers crate's (the
//! operator tools behind `sluice dlq` read both); its writer is private to
//! it, so projections publish through this one, which follows it.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::Error;

// The format is the workers' (one contract, one set of names): reuse them.
pub use sluice_workers::{DLQ_PREFIX, DLQ_STREAM, INVALID_CATEGORY, headers};

/// Why an event was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterKind {
    /// It breaks the envelope contract (or its subject is not valid).
    Decode,
    /// The projection rejected it.
    Handler,
    /// Held behind an earlier dead letter of the same aggregate.
    Parked,
}

impl DeadLetterKind {
    /// The wire name (`Sluice-Dlq-Kind`, `sluice_dead_letters.kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Decode => "decode",
            Self::Handler => "handler",
            Self::Parked => "parked",
        }
    }
}

/// One event to dead-letter.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetter<'a> {
    pub(crate) position: u64,
    pub(crate) subject: &'a str,
    pub(crate) category: &'a str,
    pub(crate) headers: Option<&'a HeaderMap>,
    pub(crate) payload: &'a Bytes,
    pub(crate) kind: DeadLetterKind,
    pub(crate) reason: String,
    pub(crate) behind: Option<u64>,
}

/// Publishes dead letters to the `DLQ` stream.
#[derive(Debug, Clone)]
pub struct DlqWriter {
    js: jetstream::Context,
    events_stream: String,
}

impl DlqWriter {
    /// Ensures the `DLQ` stream (same settings as the workers create).
    pub async fn new(js: jetstream::Context, events_stream: &str) -> Result<Self, Error> {
        if js.get_stream(DLQ_STREAM).await.is_err() {
            let config = stream::Config {
                name: DLQ_STREAM.to_owned(),
                subjects: vec![format!("{DLQ_PREFIX}.>")],
                storage: stream::StorageType::File,
                allow_direct: true,
                // Dedup by `<stream>:<consumer>:<seq>` for a day, so a batch
                // retried after a crash never dead-letters an event twice.
                duplicate_window: Duration::from_secs(24 * 3600),
                description: Some(
                    "Sluice dead letters: original body and headers plus Sluice-Dlq-* headers"
                        .to_owned(),
                ),
                ..Default::default()
            };
            if let Err(e) = js.create_stream(config).await {
                // Another process may have created it in the meantime.
                if js.get_stream(DLQ_STREAM).await.is_err() {
                    return Err(Error::nats("creating the DLQ stream", e));
                }
            }
        }
        Ok(Self {
            js,
            events_stream: events_stream.to_owned(),
        })
    }

    /// Publishes one dead letter and waits for the server's ack.
    pub(crate) async fn write(&self, consumer: &str, dl: &DeadLetter<'_>) -> Result<(), Error> {
        let mut h = HeaderMap::new();
        if let Some(original) = dl.headers {
            for (name, values) in original.iter() {
                let name: &str = name.as_ref();
                // The server's control headers must not be replayed: a stored
                // event of an atomic append still carries `Nats-Batch-*`
                // (which would make this publish a batch), and
                // `Nats-Msg-Id` is replaced by the dedup id (kept aside).
                if name.len() > 5 && name[..5].eq_ignore_ascii_case("Nats-") {
                    if name.eq_ignore_ascii_case(headers::MSG_ID) {
                        for v in values {
                            h.insert(headers::ORIGINAL_MSG_ID, v.as_str());
                        }
                    }
                    continue;
                }
                if name.starts_with("Sluice-Dlq-") {
                    continue;
                }
                for v in values {
                    h.append(name, v.as_str());
                }
            }
        }
        let failed_at = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default();
        // Header values are one line: a reason never breaks the framing.
        let reason: String = dl
            .reason
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(1000)
            .collect();
        h.insert(headers::REASON, reason.as_str());
        h.insert(headers::STREAM, self.events_stream.as_str());
        h.insert(headers::SEQUENCE, dl.position.to_string().as_str());
        h.insert(headers::CONSUMER, consumer);
        h.insert(headers::DELIVERIES, "1");
        h.insert(headers::FAILED_AT, failed_at.as_str());
        h.insert(headers::SUBJECT, dl.subject);
        h.insert(headers::KIND, dl.kind.as_str());
        if let Some(behind) = dl.behind {
            h.insert(headers::PARKED_BEHIND, behind.to_string().as_str());
        }
        let dedup = format!("{}:{consumer}:{}", self.events_stream, dl.position);
        h.insert(headers::MSG_ID, dedup.as_str());
        let category = if dl.category.is_empty() {
            INVALID_CATEGORY
        } else {
            dl.category
        };
        let subject = format!("{DLQ_PREFIX}.{consumer}.{category}");
        self.js
            .publish_with_headers(subject, h, dl.payload.clone())
            .await
            .map_err(|e| Error::nats("publishing a dead letter", e))?
            .await
            .map_err(|e| Error::nats("publishing a dead letter", e))?;
        Ok(())
    }
}
