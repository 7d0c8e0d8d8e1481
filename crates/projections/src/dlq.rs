//! A projection's dead letters in the one dead-letter model: written by the
//! workers' writer ([`sluice_workers::dlq::write`], so the format and the
//! always-fits rule are one), and settled by DLQ id ([`discard`],
//! [`redrive_dead_letter`]) so that the `DLQ` stream copy, the projection's
//! own record (`sluice_dead_letters`) and its parking (`sluice_parked`)
//! always agree.
//!
//! A projection's dead letters live on `dlq.projection-<name>.<category>`.

use async_nats::HeaderMap;
use bytes::Bytes;
use sluice_events::EventStore;
use sluice_workers::dlq::{self as wdlq, NewDeadLetter};
use sqlx::Row;

use crate::db::Database;
use crate::error::Error;
use crate::replay::RedriveReport;
use crate::runner::{Member, Runner, RunnerConfig, consumer_name, to_i64, to_u64};

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
    let js = store.jetstream();
    if reason.trim().is_empty() {
        return Err(sluice_workers::Error::MissingReason.into());
    }
    let entry = wdlq::show(js, id).await?;
    let Some(projection) = projection_of(&entry.consumer) else {
        return Ok(wdlq::discard(js, id, reason).await?);
    };
    forget(db, projection, entry.sequence).await?;
    wdlq::remove(js, &entry, "discard", reason).await?;
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
    let known =
        sqlx::query("SELECT 1 FROM sluice_dead_letters WHERE projection = $1 AND position = $2")
            .bind(projection)
            .bind(to_i64(position))
            .fetch_optional(db.pool())
            .await?
            .is_some();
    let js = store.jetstream();
    let copies = wdlq::list(
        js,
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
        wdlq::remove(js, &entry, "discard", reason).await?;
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
/// releases the parking of its aggregate.
async fn forget(db: &Database, projection: &str, position: u64) -> Result<(), Error> {
    let mut tx = db.pool().begin().await?;
    crate::replay::lock_checkpoint(&mut tx, projection).await?;
    let stream: Option<String> = sqlx::query(
        "SELECT stream FROM sluice_dead_letters WHERE projection = $1 AND position = $2",
    )
    .bind(projection)
    .bind(to_i64(position))
    .fetch_optional(&mut *tx)
    .await?
    .map(|r| r.try_get(0))
    .transpose()?;
    if let Some(stream) = stream {
        sqlx::query("DELETE FROM sluice_dead_letters WHERE projection = $1 AND position = $2")
            .bind(projection)
            .bind(to_i64(position))
            .execute(&mut *tx)
            .await?;
        let head: Option<u64> = sqlx::query(
            "SELECT behind_position FROM sluice_parked WHERE projection = $1 AND stream = $2",
        )
        .bind(projection)
        .bind(stream.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.try_get::<i64, _>(0).map(to_u64))
        .transpose()?;
        if head == Some(position) {
            let next: Option<i64> = sqlx::query(
                "SELECT MIN(position) FROM sluice_dead_letters WHERE projection = $1 AND stream = $2",
            )
            .bind(projection)
            .bind(stream.as_str())
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
            match next {
                Some(next) => {
                    sqlx::query(
                        "UPDATE sluice_parked SET behind_position = $1 WHERE projection = $2 AND stream = $3",
                    )
                    .bind(next)
                    .bind(projection)
                    .bind(stream.as_str())
                    .execute(&mut *tx)
                    .await?;
                }
                None => {
                    sqlx::query("DELETE FROM sluice_parked WHERE projection = $1 AND stream = $2")
                        .bind(projection)
                        .bind(stream.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Redrives dead letter `id` of `member` (a projection): applies the events
/// its aggregate dead-lettered, from the head on, in order and exactly once
/// (the same as `sluice projection dlq <name> redrive` for that aggregate),
/// releases the aggregate when all apply, and removes their `DLQ` copies.
/// Refused ([`sluice_workers::Error::NotHead`]) for a dead letter parked
/// behind an earlier one, as for workers. A dead letter an earlier redrive
/// removed answers with `already_redriven`.
pub async fn redrive_dead_letter(
    member: Member,
    db: Database,
    store: EventStore,
    id: u64,
) -> Result<RedriveReport, Error> {
    let js = store.jetstream().clone();
    let entry = match wdlq::show(&js, id).await {
        Ok(e) => e,
        Err(sluice_workers::Error::NotFound(id)) => {
            let trail = wdlq::audit_trail(&js, id).await?;
            if trail.iter().any(|r| r["action"] == "redrive") {
                return Ok(RedriveReport {
                    already_redriven: vec![id],
                    ..RedriveReport::default()
                });
            }
            return Err(sluice_workers::Error::NotFound(id).into());
        }
        Err(e) => return Err(e.into()),
    };
    let name = member.name();
    let stream: Option<(String, Option<u64>)> = sqlx::query(
        "SELECT d.stream, p.behind_position FROM sluice_dead_letters d \
         LEFT JOIN sluice_parked p ON p.projection = d.projection AND p.stream = d.stream \
         WHERE d.projection = $1 AND d.position = $2",
    )
    .bind(name)
    .bind(to_i64(entry.sequence))
    .fetch_optional(db.pool())
    .await?
    .map(|r| Ok::<_, sqlx::Error>((r.try_get(0)?, r.try_get::<Option<i64>, _>(1)?.map(to_u64))))
    .transpose()?;
    let Some((stream, head)) = stream else {
        // The projection has no record of it (applied by an earlier redrive
        // or a replay): only the copy is left over.
        wdlq::remove(
            &js,
            &entry,
            "redrive",
            "the projection has no record of it any more",
        )
        .await?;
        return Ok(RedriveReport {
            redriven: vec![id],
            ..RedriveReport::default()
        });
    };
    if let Some(head) = head.filter(|h| *h < entry.sequence) {
        let listing = wdlq::list(
            &js,
            &wdlq::Filter {
                consumer: Some(entry.consumer.clone()),
                category: Some(entry.category.clone()),
                reason: None,
            },
        )
        .await?;
        let head_id = listing
            .entries
            .iter()
            .find(|e| e.subject == entry.subject && e.sequence == head)
            .map_or(0, |e| e.id);
        return Err(sluice_workers::Error::NotHead { id, head: head_id }.into());
    }
    let runner = Runner::group(vec![member], db, store, RunnerConfig::default()).await?;
    runner.redrive_streams(&[stream]).await
}
