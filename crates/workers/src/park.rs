//! Parked aggregates: once an event of aggregate X is dead-lettered for
//! consumer C, later events of X for C are dead-lettered *behind* it (parked)
//! instead of being applied out of order, until the operator redrives or
//! discards the head.
//!
//! The set lives in the JetStream KV bucket `SLUICE_PARKED` (key
//! `<consumer>.<category>.<id>`), so it survives restarts and is shared by
//! replicas. Every change is a compare-and-set on the key's revision, because
//! a live consumer, a redrive consumer and an operator may touch one key at
//! once. Workers keep a cache fed by a KV watch, so the common case (not
//! parked) costs no round trip.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_nats::jetstream::kv;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sluice_events::StreamId;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::Error;

/// How often a compare-and-set is retried when someone else wrote first.
const CAS_ATTEMPTS: usize = 32;

/// The parked state of one aggregate for one consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parked {
    /// Stream sequence of the dead letter the aggregate waits behind.
    pub head: u64,
    /// Highest stream sequence of the aggregate dead-lettered so far
    /// (head or parked); the aggregate is released once this one is handled.
    pub through: u64,
    /// When the aggregate was parked (RFC 3339).
    pub since: String,
}

type Cache = Arc<RwLock<HashMap<String, (u64, Option<Parked>)>>>;

/// Access to the parked set of one consumer.
#[derive(Clone)]
pub(crate) struct Parks {
    kv: kv::Store,
    consumer: String,
    cache: Option<Cache>,
}

pub(crate) fn key(consumer: &str, stream_id: &StreamId) -> String {
    format!("{consumer}.{}.{}", stream_id.category(), stream_id.id())
}

fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

enum Cas {
    Done,
    Retry,
}

impl Parks {
    /// Uncached access (operator tools: every read goes to the server).
    pub(crate) fn uncached(kv: kv::Store, consumer: &str) -> Self {
        Self {
            kv,
            consumer: consumer.to_owned(),
            cache: None,
        }
    }

    /// Cached access for a running worker: loads the consumer's keys, then
    /// follows changes until `cancel` fires.
    pub(crate) async fn cached(
        kv: kv::Store,
        consumer: &str,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<Self, Error> {
        let cache: Cache = Arc::default();
        // The watch delivers each key's current value first, then changes;
        // start it before scanning so nothing falls between the two.
        let mut watch = kv
            .watch(format!("{consumer}.>"))
            .await
            .map_err(|e| Error::nats("watching parked aggregates", e))?;
        let prefix = format!("{consumer}.");
        let mut keys = kv
            .keys()
            .await
            .map_err(|e| Error::nats("listing parked aggregates", e))?;
        while let Some(k) = keys.next().await {
            let k = k.map_err(|e| Error::nats("listing parked aggregates", e))?;
            if !k.starts_with(&prefix) {
                continue;
            }
            if let Some(entry) = kv
                .entry(k.clone())
                .await
                .map_err(|e| Error::nats("reading a parked aggregate", e))?
            {
                apply(&cache, &entry);
            }
        }
        let follower = cache.clone();
        let consumer_name = consumer.to_owned();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    next = watch.next() => match next {
                        Some(Ok(entry)) => apply(&follower, &entry),
                        Some(Err(e)) => {
                            tracing::warn!(consumer = %consumer_name, error = %e, "parked-set watch error");
                        }
                        None => {
                            tracing::warn!(consumer = %consumer_name, "parked-set watch ended");
                            break;
                        }
                    }
                }
            }
        });
        Ok(Self {
            kv,
            consumer: consumer.to_owned(),
            cache: Some(cache),
        })
    }

    /// Fast check: is the aggregate parked? Cached workers answer locally;
    /// a `true` is always confirmed by a compare-and-set before acting.
    pub(crate) async fn maybe_parked(&self, stream_id: &StreamId) -> Result<bool, Error> {
        let k = key(&self.consumer, stream_id);
        match &self.cache {
            Some(cache) => Ok(cache
                .read()
                .map(|c| matches!(c.get(&k), Some((_, Some(_)))))
                .unwrap_or(true)),
            None => Ok(self.get(stream_id).await?.is_some()),
        }
    }

    /// The aggregate's parked state, read from the server.
    pub(crate) async fn get(&self, stream_id: &StreamId) -> Result<Option<Parked>, Error> {
        Ok(self.entry(stream_id).await?.map(|(_, p)| p))
    }

    async fn entry(&self, stream_id: &StreamId) -> Result<Option<(u64, Parked)>, Error> {
        let k = key(&self.consumer, stream_id);
        let entry = self
            .kv
            .entry(k)
            .await
            .map_err(|e| Error::nats("reading a parked aggregate", e))?;
        Ok(entry.and_then(|e| {
            if e.operation != kv::Operation::Put {
                return None;
            }
            serde_json::from_slice::<Parked>(&e.value)
                .ok()
                .map(|p| (e.revision, p))
        }))
    }

    async fn put(&self, stream_id: &StreamId, rev: Option<u64>, p: &Parked) -> Result<Cas, Error> {
        let k = key(&self.consumer, stream_id);
        let value = serde_json::to_vec(p)
            .map_err(|e| Error::nats("encoding a parked aggregate", e))?
            .into();
        let result = match rev {
            None => self.kv.create(&k, value).await.map_err(|e| {
                if e.kind() == kv::CreateErrorKind::AlreadyExists {
                    None
                } else {
                    Some(e.to_string())
                }
            }),
            Some(r) => self.kv.update(&k, value, r).await.map_err(|e| {
                if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                    None
                } else {
                    Some(e.to_string())
                }
            }),
        };
        match result {
            Ok(new_rev) => {
                self.remember(&k, new_rev, Some(p.clone()));
                Ok(Cas::Done)
            }
            Err(None) => Ok(Cas::Retry),
            Err(Some(e)) => Err(Error::nats("writing a parked aggregate", e)),
        }
    }

    fn remember(&self, k: &str, rev: u64, value: Option<Parked>) {
        if let Some(cache) = &self.cache
            && let Ok(mut c) = cache.write()
        {
            let newer = c.get(k).is_none_or(|(r, _)| rev > *r);
            if newer {
                c.insert(k.to_owned(), (rev, value));
            }
        }
    }

    /// Records `seq` as the aggregate's dead-lettered head (a first failure,
    /// or a redriven event failing again).
    pub(crate) async fn park_head(&self, stream_id: &StreamId, seq: u64) -> Result<(), Error> {
        for _ in 0..CAS_ATTEMPTS {
            let current = self.entry(stream_id).await?;
            let (rev, next) = match current {
                None => (
                    None,
                    Parked {
                        head: seq,
                        through: seq,
                        since: now(),
                    },
                ),
                Some((rev, p)) => (
                    Some(rev),
                    Parked {
                        head: seq,
                        through: p.through.max(seq),
                        since: p.since,
                    },
                ),
            };
            if let Cas::Done = self.put(stream_id, rev, &next).await? {
                return Ok(());
            }
        }
        Err(Error::nats("parking an aggregate", "too much contention"))
    }

    /// Parks `seq` behind the aggregate's head. Returns the head, or `None`
    /// when the event is not to be parked: the aggregate is no longer parked
    /// (released meanwhile), or the event precedes the head (a redelivery
    /// of one handled before the head failed). Either way, handle it.
    pub(crate) async fn park_behind(
        &self,
        stream_id: &StreamId,
        seq: u64,
    ) -> Result<Option<u64>, Error> {
        for _ in 0..CAS_ATTEMPTS {
            let Some((rev, p)) = self.entry(stream_id).await? else {
                self.remember(&key(&self.consumer, stream_id), 0, None);
                return Ok(None);
            };
            if p.head == seq {
                // A redelivery of the head itself (crash after parking).
                return Ok(Some(seq));
            }
            if seq < p.head {
                // An event from before the head: it was handled before the
                // head failed, and comes back because its ack was lost (a
                // crash). It is no reason to wait behind the head: the
                // idempotent handler takes it; parking it would dead-letter
                // an event that succeeded.
                return Ok(None);
            }
            let next = Parked {
                through: p.through.max(seq),
                ..p.clone()
            };
            if let Cas::Done = self.put(stream_id, Some(rev), &next).await? {
                return Ok(Some(p.head));
            }
        }
        Err(Error::nats("parking an aggregate", "too much contention"))
    }

    /// After a redriven event `seq` was handled: releases the aggregate when
    /// nothing parked remains behind it. Returns true when released, false
    /// when later events are still parked (their head moves past `seq`).
    pub(crate) async fn release_after(
        &self,
        stream_id: &StreamId,
        seq: u64,
    ) -> Result<bool, Error> {
        for _ in 0..CAS_ATTEMPTS {
            let Some((rev, p)) = self.entry(stream_id).await? else {
                return Ok(true);
            };
            if p.through > seq {
                return Ok(false);
            }
            if self.delete(stream_id, rev).await? {
                return Ok(true);
            }
        }
        Err(Error::nats("releasing an aggregate", "too much contention"))
    }

    /// Moves the head to `head` (after the old head was discarded).
    pub(crate) async fn move_head(&self, stream_id: &StreamId, head: u64) -> Result<(), Error> {
        for _ in 0..CAS_ATTEMPTS {
            let Some((rev, p)) = self.entry(stream_id).await? else {
                return Ok(());
            };
            let next = Parked { head, ..p };
            if let Cas::Done = self.put(stream_id, Some(rev), &next).await? {
                return Ok(());
            }
        }
        Err(Error::nats("moving a parked head", "too much contention"))
    }

    /// Releases the aggregate unconditionally (nothing of it is left in the DLQ).
    pub(crate) async fn release(&self, stream_id: &StreamId) -> Result<(), Error> {
        for _ in 0..CAS_ATTEMPTS {
            let Some((rev, _)) = self.entry(stream_id).await? else {
                return Ok(());
            };
            if self.delete(stream_id, rev).await? {
                return Ok(());
            }
        }
        Err(Error::nats("releasing an aggregate", "too much contention"))
    }

    async fn delete(&self, stream_id: &StreamId, rev: u64) -> Result<bool, Error> {
        let k = key(&self.consumer, stream_id);
        match self.kv.delete_expect_revision(&k, Some(rev)).await {
            Ok(()) => {
                // The delete marker's revision is unknown here; rev + 1 is a
                // lower bound, and the watch brings the exact one.
                self.remember(&k, rev + 1, None);
                Ok(true)
            }
            Err(e) => {
                // The client does not classify a wrong-revision delete: look
                // whether the key moved on (someone else wrote first).
                let moved = self
                    .kv
                    .entry(k)
                    .await
                    .map(|entry| entry.is_none_or(|en| en.revision != rev))
                    .unwrap_or(false);
                if moved {
                    Ok(false)
                } else {
                    Err(Error::nats("releasing an aggregate", e))
                }
            }
        }
    }
}

fn apply(cache: &Cache, entry: &kv::Entry) {
    let value = match entry.operation {
        kv::Operation::Put => serde_json::from_slice::<Parked>(&entry.value).ok(),
        kv::Operation::Delete | kv::Operation::Purge => None,
    };
    if let Ok(mut c) = cache.write() {
        let newer = c.get(&entry.key).is_none_or(|(r, _)| entry.revision >= *r);
        if newer {
            c.insert(entry.key.clone(), (entry.revision, value));
        }
    }
}
