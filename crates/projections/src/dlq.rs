//! A projection's dead letters in the one dead-letter model: written by the
//! workers' writer ([`sluice_workers::dlq::write`], so the format and the
//! always-fits rule are one), and settled by DLQ id ([`discard`] here,
//! [`crate::redrive_dead_letter`] with the other redrives) so that the `DLQ`
//! stream copy, the projection's own record (`sluice_dead_letters`) and its
//! parking (`sluice_parked`) always agree.
//!
//! A projection's dead letters live on `dlq.projection-<name>.<category>`.

use async_nats::HeaderMap;
use bytes::Bytes;
use sluice_events::EventStore;
use sluice_workers::dlq::{self as wdlq, NewDeadLetter};

use crate::bookkeeping;
use crate::db::Database;
use crate::error::Error;

// The format is the workers' (one contract, one set of names): reuse them.
pub use sluice_workers::dlq::Kind as DeadLetterKind;
pub use sluice_workers::{DLQ_PREFIX, DLQ_STREAM, INVALID_CATEGORY, headers};

/// One event to dead-letter.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetter<'a> {
    pub(crate) position: u64,
    pub(crate) subject: &'a str,
    pub(crate) headers: Option<&'a HeaderMap>,
    pub(crate) payload: &'a Bytes,
    pub(crate) kind: DeadLetterKind,
    pub(crate) reason: String,
    pub(crate) behind: Option<u64>,
}

impl DeadLetter<'_> {
    /// The writer's input for `consumer`, the original living in `stream`.
    pub(crate) fn to_new<'b>(&'b self, consumer: &'b str, stream: &'b str) -> NewDeadLetter<'b> {
        NewDeadLetter {
            consumer,
            subject: self.subject,
            stream,
            sequence: self.position,
            deliveries: 1,
            reason: &self.reason,
            kind: self.kind,
            headers: self.headers,
            payload: self.payload.clone(),
            parked_behind: self.behind,
            redrive_of: None,
        }
    }
}

/// The consumer name a projection uses in dead letters (`dlq.<consumer>.<category>`).
pub fn consumer_name(projection: &str) -> String {
    format!("projection-{projection}")
}

/// The projection a dead letter's consumer names (`projection-<name>`), if any.
pub fn projection_of(consumer: &str) -> Option<&str> {
    consumer.strip_prefix(&consumer_name(""))
}

/// Discards dead letter `id` for good, with `reason` kept in the audit log.
///
/// For a projection's dead letter this first drops the projection's record
/// of it and its parking, in one transaction that takes the runner's lock:
/// when it was the head of a parked aggregate, the next dead letter of that
/// aggregate becomes the head; when none is left, the aggregate is released
/// and its later events apply. Then the `DLQ` copy goes. Any other
/// consumer's dead letter is discarded as the workers do it.
pub async fn discard(
    db: &Database,
    store: &EventStore,
    id: u64,
    reason: &str,
) -> Result<wdlq::DeadLetter, Error> {
    if reason.trim().is_empty() {
        return Err(sluice_workers::Error::MissingReason.into());
    }
    let entry = wdlq::show(store, id).await?;
    let Some(projection) = projection_of(&entry.consumer) else {
        return Ok(wdlq::discard(store, id, reason).await?);
    };
    forget(db, projection, entry.sequence).await?;
    wdlq::remove(store, &entry, "discard", reason).await?;
    tracing::info!(
        dlq_id = id,
        projection,
        position = entry.sequence,
        reason,
        "projection dead letter discarded"
    );
    Ok(entry)
}

/// Discards `projection`'s dead letter at stream `position` (what `sluice
/// projection dlq <name> discard <position>` names): the same as [`discard`]
/// of its `DLQ` copy; when the copy is gone, the record and parking are
/// settled all the same. `Ok(false)` when the projection has no such dead letter.
pub async fn discard_position(
    db: &Database,
    store: &EventStore,
    projection: &str,
    position: u64,
    reason: &str,
) -> Result<bool, Error> {
    if reason.trim().is_empty() {
        return Err(sluice_workers::Error::MissingReason.into());
    }
    let known = bookkeeping::has_dead_letter(db.pool(), projection, position).await?;
    let copies = wdlq::list(
        store,
        &wdlq::Filter {
            consumer: Some(consumer_name(projection)),
            ..Default::default()
        },
    )
    .await?;
    let copy = copies
        .entries
        .into_iter()
        .find(|e| e.sequence == position && e.stream == store.config().stream);
    if !known && copy.is_none() {
        return Ok(false);
    }
    forget(db, projection, position).await?;
    if let Some(entry) = copy {
        wdlq::remove(store, &entry, "discard", reason).await?;
    }
    tracing::info!(
        projection,
        position,
        reason,
        "projection dead letter discarded"
    );
    Ok(true)
}

/// Drops `projection`'s record of the dead letter at `position` and moves or
/// releases the parking of its aggregate, holding the runner's lock.
async fn forget(db: &Database, projection: &str, position: u64) -> Result<(), Error> {
    let mut tx = db.pool().begin().await?;
    bookkeeping::lock_checkpoint(&mut tx, projection).await?;
    bookkeeping::forget_dead_letter(&mut tx, projection, position).await?;
    tx.commit().await?;
    Ok(())
}
