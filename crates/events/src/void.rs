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
//! projections and workers (through [`Voided`]).
//!
//! The voided set is the subjects of the void category: each process loads
//! it once (one ordered consumer, headers only) and follows it live, so a
//! lookup is an in-memory set probe.

use std::collections::HashSet;
use std::sync::{Arc, RwLock, Weak};

use async_nats::jetstream::consumer::{self, pull};
use async_nats::jetstream::stream::DirectGetErrorKind;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::envelope::{H_ID, H_TYPE, NewEvent};
use crate::error::Error;
use crate::ids::{EventId, StreamId};
use crate::store::{EventStore, ExpectedVersion};

/// The platform category holding void records (reserved on the public append).
pub const VOID_CATEGORY: &str = "sluice-void";
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

/// The voided positions as this process knows them: loaded once, then
/// followed live. Cheap to clone and to query.
#[derive(Clone)]
pub struct Voided {
    inner: Arc<Shared>,
}

struct Shared {
    set: RwLock<HashSet<u64>>,
    /// Positions in the order this process learnt them (for "what is new").
    log: RwLock<Vec<u64>>,
    changed: tokio::sync::watch::Sender<usize>,
    /// Dropped with the last handle: ends the follower.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl std::fmt::Debug for Voided {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Voided")
            .field("count", &self.len())
            .finish()
    }
}

impl Voided {
    /// True when the event at `position` is voided.
    pub fn contains(&self, position: u64) -> bool {
        self.inner
            .set
            .read()
            .map(|s| s.contains(&position))
            .unwrap_or(false)
    }

    /// How many positions are voided (as far as this process knows).
    pub fn len(&self) -> usize {
        self.inner.log.read().map(|l| l.len()).unwrap_or(0)
    }

    /// True when nothing is voided.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The voided positions learnt after the first `seen` (pass [`len`]
    /// from last time), in the order they were learnt.
    ///
    /// [`len`]: Voided::len
    pub fn since(&self, seen: usize) -> Vec<u64> {
        self.inner
            .log
            .read()
            .map(|l| l.get(seen..).map(<[u64]>::to_vec).unwrap_or_default())
            .unwrap_or_default()
    }

    /// A receiver that changes whenever a position is voided (its value is
    /// [`len`](Voided::len)).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<usize> {
        self.inner.changed.subscribe()
    }

    pub(crate) fn insert(&self, position: u64) {
        insert(&self.inner, position);
    }

    /// Loads the void records' subjects and follows new ones.
    pub(crate) async fn load(store: &EventStore) -> Result<Self, Error> {
        let cfg = store.config();
        let stream = store
            .jetstream()
            .get_stream_no_info(&cfg.stream)
            .await
            .map_err(|e| Error::Nats(e.to_string()))?;
        let ordered = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: format!("{}.{VOID_CATEGORY}.>", cfg.subject_prefix),
                deliver_policy: consumer::DeliverPolicy::All,
                headers_only: true,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Nats(e.to_string()))?;
        let mut pending = ordered.cached_info().num_pending;
        let mut messages = ordered
            .messages()
            .await
            .map_err(|e| Error::Nats(e.to_string()))?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let inner = Arc::new(Shared {
            set: RwLock::default(),
            log: RwLock::default(),
            changed: tokio::sync::watch::channel(0).0,
            _stop: stop,
        });
        let prefix = format!("{}.{VOID_CATEGORY}.", cfg.subject_prefix);
        let position_of = move |m: &async_nats::jetstream::Message| -> Option<u64> {
            m.subject.strip_prefix(prefix.as_str())?.parse().ok()
        };
        while pending > 0 {
            let m = tokio::time::timeout(cfg.request_timeout, messages.next())
                .await
                .map_err(|_| Error::Timeout(cfg.request_timeout))?
                .ok_or_else(|| Error::Nats("the void feed ended".to_owned()))?
                .map_err(|e| Error::Nats(e.to_string()))?;
            if let Some(p) = position_of(&m) {
                insert(&inner, p);
            }
            pending = m.info().map(|i| i.pending).unwrap_or(0);
        }
        let weak: Weak<Shared> = Arc::downgrade(&inner);
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = &mut stopped => break,
                    m = messages.next() => m,
                };
                match next {
                    Some(Ok(m)) => {
                        let (Some(shared), Some(p)) = (weak.upgrade(), position_of(&m)) else {
                            continue;
                        };
                        insert(&shared, p);
                        tracing::info!(position = p, "event voided");
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "void feed error; it resumes"),
                    None => {
                        tracing::warn!(
                            "void feed ended: voids from now on are not seen by this process until it restarts"
                        );
                        break;
                    }
                }
            }
        });
        Ok(Self { inner })
    }
}

fn insert(shared: &Shared, position: u64) {
    let new = shared
        .set
        .write()
        .map(|mut s| s.insert(position))
        .unwrap_or(false);
    if new {
        let len = shared
            .log
            .write()
            .map(|mut l| {
                l.push(position);
                l.len()
            })
            .unwrap_or(0);
        shared.changed.send_replace(len);
    }
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
            .map_err(|e| Error::Nats(e.to_string()))?;
        let msg = match stream.direct_get(position).await {
            Ok(m) => m,
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => {
                return Err(Error::NoSuchEvent(position));
            }
            Err(e) => return Err(Error::Nats(e.to_string())),
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
        if let Some(v) = self.voided_if_loaded() {
            v.insert(position);
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
            .map_err(|e| Error::Nats(e.to_string()))?;
        match stream.direct_get_first_for_subject(subject).await {
            Ok(m) => {
                let mut v: Voiding = serde_json::from_slice(&m.payload).map_err(|e| {
                    Error::InvalidJson(format!("void record at {}: {e}", m.sequence))
                })?;
                v.void_position = m.sequence;
                Ok(Some(v))
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Nats(e.to_string())),
        }
    }
}
