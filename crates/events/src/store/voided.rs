//! The voided positions: every consumer of the store skips them (see
//! [`crate::EventStore::void`] for how an event is voided).
//!
//! The voided set is the subjects of the void category: each process loads
//! it once (one ordered consumer, headers only) and follows it live, so a
//! lookup is an in-memory set probe.

use std::collections::HashSet;
use std::sync::{Arc, RwLock, Weak};

use async_nats::jetstream::consumer::{self, pull};
use async_nats::jetstream::stream;
use futures::StreamExt;

use super::config::StoreConfig;
use crate::error::Error;
use crate::ids::StreamId;

/// The platform category holding void records (reserved on the public append).
pub const VOID_CATEGORY: &str = "sluice-void";

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

    /// Learns of a void record this process appended itself
    /// (`events.sluice-void.<position>` landed), without waiting for the
    /// live feed to bring it.
    pub(super) fn note_append(&self, stream_id: &StreamId) {
        if stream_id.category() == VOID_CATEGORY
            && let Ok(position) = stream_id.id().parse()
        {
            insert(&self.inner, position);
        }
    }

    /// Loads the void records' subjects and follows new ones.
    pub(super) async fn load(stream: &stream::Stream, cfg: &StoreConfig) -> Result<Self, Error> {
        let ordered = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: format!("{}.{VOID_CATEGORY}.>", cfg.subject_prefix),
                deliver_policy: consumer::DeliverPolicy::All,
                headers_only: true,
                ..Default::default()
            })
            .await
            .map_err(Error::CreateReader)?;
        let mut pending = ordered.cached_info().num_pending;
        let mut messages = ordered.messages().await.map_err(Error::OpenReader)?;
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
                .map_err(Error::Read)?;
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
