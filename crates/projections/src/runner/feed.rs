//! The feed: events read from the log (an ordered consumer from the
//! checkpoint on, or a range or a handful of positions for a replay or a
//! redrive), kept raw so a dead letter carries the original, and decoded
//! once per batch for every member of a group.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{self, pull};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use sluice_events::{Envelope, StreamId};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::Runner;
use crate::error::Error;
use crate::projection::ProjectedEvent;

/// One message as fetched, kept raw so a dead letter carries the original.
#[derive(Debug)]
pub(crate) struct Raw {
    pub(crate) position: u64,
    pub(crate) subject: String,
    pub(crate) headers: Option<HeaderMap>,
    pub(crate) payload: Bytes,
    pub(crate) appended_at: OffsetDateTime,
    /// Messages the broker still holds for us after this one (the lag).
    pub(crate) pending: u64,
}

/// A fetched message after classification (once per batch, shared by the
/// members of a group).
pub(crate) enum Item {
    /// Of no member's categories: only moves the checkpoints.
    Skip,
    /// Of some member's categories but breaks the contract.
    Bad {
        key: String,
        category: String,
        reason: String,
    },
    /// Decoded.
    Event(Box<ProjectedEvent>),
}

impl Item {
    pub(crate) fn category(&self) -> Option<&str> {
        match self {
            Item::Skip => None,
            Item::Bad { category, .. } => Some(category),
            Item::Event(e) => Some(e.stream_id.category()),
        }
    }
}

/// What waiting for events gave.
pub(super) enum Fetched {
    /// Messages with what they decoded to.
    Batch(Vec<(Raw, Item)>),
    /// Nothing for `idle_check`.
    Idle,
    Shutdown,
}

impl Runner {
    pub(super) async fn open(&self, from: u64) -> Result<pull::Ordered, Error> {
        let cfg = self.store.config();
        let stream = self
            .store
            .event_stream()
            .await
            .map_err(|e| Error::nats("opening the event stream", e))?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                // Every event, not only our categories: the checkpoint then
                // is a global position, which `min_position` compares with.
                filter_subject: format!("{}.>", cfg.subject_prefix),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| Error::nats("creating an ordered consumer", e))?;
        consumer
            .messages()
            .await
            .map_err(|e| Error::nats("reading the event stream", e))
    }

    /// Waits for the next event, then takes as many more as the lag
    /// suggests (up to `max_batch`).
    pub(super) async fn next_batch(
        &self,
        messages: &mut pull::Ordered,
        shutdown: &CancellationToken,
    ) -> Result<Fetched, Error> {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(Fetched::Shutdown),
            m = messages.next() => m,
            _ = tokio::time::sleep(self.config.idle_check) => return Ok(Fetched::Idle),
        };
        let first = raw(first)?;
        let pending = first.pending;
        // Batch size follows the lag: one event when caught up (latency),
        // up to max_batch when behind (throughput).
        let want = usize::try_from(pending.saturating_add(1))
            .unwrap_or(usize::MAX)
            .clamp(1, self.config.max_batch.max(1));
        let mut batch = Vec::with_capacity(want);
        batch.push(first);
        let deadline = tokio::time::Instant::now() + self.config.linger;
        while batch.len() < want {
            let next = if pending > 0 {
                tokio::time::timeout_at(deadline, messages.next())
                    .await
                    .ok()
                    .flatten()
            } else {
                messages.next().now_or_never().flatten()
            };
            match next {
                Some(m) => match raw(Some(m)) {
                    Ok(r) => batch.push(r),
                    // Apply what we have; the next read reports the error.
                    Err(_) => break,
                },
                None => break,
            }
        }
        let batch = batch
            .into_iter()
            .map(|r| {
                let item = self.classify(&r);
                (r, item)
            })
            .collect();
        Ok(Fetched::Batch(batch))
    }

    /// Decodes a message once if any member reads its category.
    pub(crate) fn classify(&self, r: &Raw) -> Item {
        if self.voided.contains(r.position) {
            return Item::Skip;
        }
        let prefix = &self.store.config().subject_prefix;
        let category = r
            .subject
            .strip_prefix(prefix.as_str())
            .and_then(|s| s.strip_prefix('.'))
            .unwrap_or("")
            .split('.')
            .next()
            .unwrap_or("");
        if !self
            .slots
            .iter()
            .any(|s| s.projection.dyn_categories().contains(&category))
        {
            return Item::Skip;
        }
        let stream_id = match StreamId::from_subject(prefix, &r.subject) {
            Ok(s) => s,
            Err(e) => {
                return Item::Bad {
                    key: r.subject.clone(),
                    category: category.to_owned(),
                    reason: e.to_string(),
                };
            }
        };
        // The contract's size limit holds for every reader, not only the
        // append: an oversized event a raw client published is refused here.
        let limit = self.store.config().max_payload;
        match Envelope::decode(r.headers.as_ref(), &r.payload, limit) {
            Ok(envelope) => Item::Event(Box::new(ProjectedEvent {
                stream_id,
                position: r.position,
                envelope,
                appended_at: r.appended_at,
            })),
            Err(e) => Item::Bad {
                key: stream_id.to_string(),
                category: category.to_owned(),
                reason: sluice_workers::dlq::decode_reason(&e),
            },
        }
    }

    /// Events on `filter` at positions `from..=until`, in log order.
    pub(crate) async fn fetch_range(
        &self,
        filter: String,
        from: u64,
        until: u64,
    ) -> Result<Vec<Raw>, Error> {
        if until < from.max(1) {
            return Ok(Vec::new());
        }
        let stream = self
            .store
            .event_stream()
            .await
            .map_err(|e| Error::nats("opening the event stream", e))?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| Error::nats("creating an ordered consumer", e))?;
        let mut out = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(out);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| Error::nats("reading the event stream", e))?;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), messages.next())
                .await
                .map_err(|_| Error::nats("reading the event stream", "no event for 30 s"))?;
            let r = raw(m)?;
            let (position, pending) = (r.position, r.pending);
            if position > until {
                break;
            }
            out.push(r);
            if position >= until || pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// The events at `positions` (direct gets; a redrive's handful).
    pub(crate) async fn fetch_positions(&self, positions: &[u64]) -> Result<Vec<Raw>, Error> {
        let stream = self
            .store
            .event_stream()
            .await
            .map_err(|e| Error::nats("opening the event stream", e))?;
        let mut out = Vec::with_capacity(positions.len());
        for &p in positions {
            // A direct get: the message as stored, however large (the
            // JSON API would base64 a near-`max_payload` body past it).
            let m = stream
                .direct_get(p)
                .await
                .map_err(|e| Error::nats("reading a dead-lettered event", e))?;
            out.push(Raw {
                position: m.sequence,
                subject: m.subject.to_string(),
                headers: Some(m.headers),
                payload: m.payload,
                appended_at: m.time,
                pending: 0,
            });
        }
        Ok(out)
    }
}

fn raw(
    m: Option<Result<async_nats::jetstream::Message, pull::OrderedError>>,
) -> Result<Raw, Error> {
    let m = m
        .ok_or_else(|| Error::nats("reading the event stream", "the feed ended"))?
        .map_err(|e| Error::nats("reading the event stream", e))?;
    let info = m
        .info()
        .map_err(|e| Error::nats("reading message info", e))?;
    let (position, pending, appended_at) = (info.stream_sequence, info.pending, info.published);
    // Taken apart rather than cloned: a header map is ~20 allocations.
    let async_nats::Message {
        subject,
        headers,
        payload,
        ..
    } = m.message;
    Ok(Raw {
        position,
        subject: subject.to_string(),
        headers,
        payload,
        appended_at,
        pending,
    })
}
