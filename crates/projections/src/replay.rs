//! Partial recovery of a live projection, safe while its runner runs:
//! [`replay`] (undo the events from a position on and let the runner apply
//! them again) and [`redrive`] (apply the events a projection dead-lettered,
//! once their cause is fixed, releasing the aggregates parked behind them).
//!
//! Both take their turn through the projection's checkpoint row, like a
//! runner's batch: they lock it first, so a runner's batch commits before or
//! after them, never interleaved. A replay moves the checkpoint back: the
//! runner's next compare-and-set fails and it follows the stored
//! checkpoint, so no event is applied twice or skipped.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull};
use futures::StreamExt;
use serde::Serialize;
use sluice_events::{EventStore, StreamId};
use sqlx::Row;
use time::OffsetDateTime;

use crate::db::Database;
use crate::dlq::{DLQ_STREAM, DeadLetterKind};
use crate::error::Error;
use crate::projection::{ProjectedEvent, RewindSupport, Tables};
use crate::runner::{
    Item, Member, Raw, Runner, RunnerConfig, raw, read_checkpoint, to_i64, to_u64, unix_ms,
};

/// A by-aggregate replay scans the log outside its transaction until at
/// most this many events are left for inside it.
const IN_TX_SCAN: u64 = 1000;

/// Above this many aggregates, their earlier events are read with one scan
/// of their categories rather than one read per aggregate.
const PER_AGGREGATE_READS: usize = 64;

/// What a [`replay`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// The projection.
    pub projection: String,
    /// The first position it applies again.
    pub from: u64,
    /// Its checkpoint before (it applies `from..=previous_checkpoint` again,
    /// and whatever came after).
    pub previous_checkpoint: u64,
    /// Aggregates whose rows were re-folded from their earlier events (only
    /// for projections that rewind by aggregate).
    pub aggregates_refolded: usize,
    /// Dead-letter records at `from` or later that were forgotten (the
    /// runner decides about those events again).
    pub dead_letters_cleared: u64,
}

/// Undoes the effects of the events at positions `>= from` in `member`'s
/// live read model and moves its checkpoint back to `from - 1`, in one
/// transaction; the runner (in this process or another) then applies them
/// again. Refuses projections that cannot undo exactly
/// ([`Error::RewindUnsupported`]: rebuild those).
pub async fn replay(
    member: Member,
    db: Database,
    store: EventStore,
    from: u64,
) -> Result<ReplayReport, Error> {
    let runner = Runner::group(vec![member], db, store, RunnerConfig::default()).await?;
    runner.replay(from).await
}

/// One event a projection did not apply (its SQL record; the `DLQ` stream
/// holds the original).
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterRecord {
    /// Its stream sequence.
    pub position: u64,
    /// Its aggregate (`<category>.<id>`, or the subject when that is invalid).
    pub stream: String,
    /// `decode`, `handler` or `parked`.
    pub kind: String,
    /// Why it was not applied.
    pub reason: String,
    /// When (Unix ms).
    pub failed_at_ms: i64,
}

/// The dead letters of `projection`, oldest position first.
pub async fn dead_letters(db: &Database, projection: &str) -> Result<Vec<DeadLetterRecord>, Error> {
    let rows = sqlx::query(
        "SELECT position, stream, kind, reason, failed_at_ms FROM sluice_dead_letters \
         WHERE projection = $1 ORDER BY position",
    )
    .bind(projection)
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(DeadLetterRecord {
                position: to_u64(r.try_get(0)?),
                stream: r.try_get(1)?,
                kind: r.try_get(2)?,
                reason: r.try_get(3)?,
                failed_at_ms: r.try_get(4)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Error::from)
}

/// What a [`redrive`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RedriveReport {
    /// Positions applied now, in order per aggregate.
    pub applied: Vec<u64>,
    /// Aggregates no longer parked (their later events apply as they come).
    pub released: Vec<String>,
    /// Dead letters still there: rejected again, or parked behind one that is.
    pub remaining: Vec<DeadLetterRecord>,
    /// Ids of the `DLQ` copies removed because their event is applied now.
    pub redriven: Vec<u64>,
    /// Dead letters an earlier redrive had already settled (nothing applied twice).
    pub already_redriven: Vec<u64>,
}

/// Applies `member`'s dead-lettered events to its live read model, per
/// parked aggregate in log order, each aggregate in one transaction with the
/// removal of its dead-letter records: exactly once. Where the projection
/// still rejects an event, the events before it are applied and the
/// aggregate stays parked behind it with the new reason. The copies in the
/// `DLQ` stream of the applied events are discarded (with an audit record).
pub async fn redrive(
    member: Member,
    db: Database,
    store: EventStore,
) -> Result<RedriveReport, Error> {
    let runner = Runner::group(vec![member], db, store, RunnerConfig::default()).await?;
    runner.redrive().await
}

/// What a by-aggregate replay has read from the log so far.
#[derive(Default)]
struct Scan {
    /// The log is scanned up to here.
    scanned: u64,
    /// Aggregates with events from the replay position on, by key.
    affected: BTreeMap<String, StreamId>,
    /// Their events before the replay position, by position.
    earlier: BTreeMap<u64, Raw>,
    /// Aggregates whose earlier events are in `earlier`.
    read_for: HashSet<String>,
}

impl Runner {
    /// Events on `filter` at positions `from..=until`, in log order.
    async fn fetch_range(&self, filter: String, from: u64, until: u64) -> Result<Vec<Raw>, Error> {
        if until < from.max(1) {
            return Ok(Vec::new());
        }
        let stream = self
            .store
            .jetstream()
            .get_stream(&self.store.config().stream)
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
    async fn fetch_positions(&self, positions: &[u64]) -> Result<Vec<Raw>, Error> {
        let stream = self
            .store
            .jetstream()
            .get_stream(&self.store.config().stream)
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

    pub(crate) async fn replay(&self, from: u64) -> Result<ReplayReport, Error> {
        let slot = &self.slots[0];
        let support = slot.projection.dyn_rewind_support();
        if support == RewindSupport::Unsupported {
            return Err(Error::RewindUnsupported {
                projection: slot.name.to_owned(),
            });
        }
        let out_of_range = |checkpoint| Error::ReplayOutOfRange {
            projection: slot.name.to_owned(),
            from,
            checkpoint,
        };
        let checkpoint = read_checkpoint(&self.db, &slot.key).await?;
        if from == 0 || from > checkpoint + 1 {
            return Err(out_of_range(checkpoint));
        }
        let mut scan = Scan {
            scanned: from - 1,
            ..Scan::default()
        };
        // Most of the reading happens before the transaction (the runner
        // keeps applying meanwhile); inside it, only what the runner
        // applied since.
        if support == RewindSupport::ByAggregate {
            // Catch up with a runner that is applying meanwhile, so that
            // what is left for inside the transaction (which holds the lock
            // the runner waits for) is small.
            let mut until = checkpoint;
            for _ in 0..5 {
                self.scan_aggregates(from, until, &mut scan).await?;
                let now = read_checkpoint(&self.db, &slot.key).await?;
                if now <= scan.scanned + IN_TX_SCAN {
                    break;
                }
                until = now;
            }
        }
        let mut tx = self.db.pool().begin().await?;
        // Take the lock a runner's batch takes (the checkpoint row in
        // PostgreSQL, the write lock in SQLite) before reading the
        // checkpoint: from here on it cannot move under us.
        lock_checkpoint(&mut tx, &slot.key).await?;
        let checkpoint =
            sqlx::query("SELECT position FROM sluice_checkpoints WHERE projection = $1")
                .bind(slot.key.as_str())
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| r.try_get::<i64, _>(0).map(to_u64))
                .transpose()?
                .unwrap_or(0);
        if from > checkpoint + 1 {
            tx.rollback().await?;
            return Err(out_of_range(checkpoint));
        }
        if support == RewindSupport::ByAggregate {
            self.scan_aggregates(from, checkpoint, &mut scan).await?;
        }
        sqlx::query(
            "UPDATE sluice_checkpoints SET position = $1, event_time_ms = 0, \
             halted_at_position = NULL, halted_reason = NULL WHERE projection = $2",
        )
        .bind(to_i64(from - 1))
        .bind(slot.key.as_str())
        .execute(&mut *tx)
        .await?;
        let aggregates: Vec<StreamId> = scan.affected.values().cloned().collect();
        slot.projection
            .dyn_rewind(&mut tx, &Tables::LIVE, from, &aggregates)
            .await?;
        if support == RewindSupport::ByAggregate && !aggregates.is_empty() {
            // Events it dead-lettered stay unapplied.
            let dead: HashSet<u64> = sqlx::query(
                "SELECT position FROM sluice_dead_letters WHERE projection = $1 AND position < $2",
            )
            .bind(slot.key.as_str())
            .bind(to_i64(from))
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get::<i64, _>(0).map(to_u64))
            .collect::<Result<_, _>>()?;
            let mut events: Vec<ProjectedEvent> = Vec::new();
            for r in scan.earlier.values() {
                if dead.contains(&r.position) {
                    continue;
                }
                if let Item::Event(e) = self.classify(r)
                    && scan.affected.contains_key(&e.stream_id.to_string())
                {
                    events.push(*e);
                }
            }
            let rejected = slot
                .projection
                .dyn_apply(&mut tx, &Tables::LIVE, &events)
                .await?;
            if let Some(first) = rejected.into_iter().min_by_key(|r| r.position) {
                tx.rollback().await?;
                return Err(Error::ReplayRejected {
                    projection: slot.name.to_owned(),
                    position: first.position,
                    reason: first.reason,
                });
            }
        }
        let cleared =
            sqlx::query("DELETE FROM sluice_dead_letters WHERE projection = $1 AND position >= $2")
                .bind(slot.key.as_str())
                .bind(to_i64(from))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        sqlx::query("DELETE FROM sluice_parked WHERE projection = $1 AND behind_position >= $2")
            .bind(slot.key.as_str())
            .bind(to_i64(from))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::warn!(
            projection = slot.name,
            from,
            previous_checkpoint = checkpoint,
            aggregates = aggregates.len(),
            "projection rewound: the runner applies the events again from here"
        );
        slot.live.update(|l| l.checkpoint = from - 1);
        Ok(ReplayReport {
            projection: slot.name.to_owned(),
            from,
            previous_checkpoint: checkpoint,
            aggregates_refolded: aggregates.len(),
            dead_letters_cleared: cleared,
        })
    }

    /// Extends `scan` to the aggregates with events in `from..=until` and
    /// their events before `from`. A superset of aggregates is harmless
    /// (re-folding an untouched aggregate rebuilds the same rows).
    async fn scan_aggregates(&self, from: u64, until: u64, scan: &mut Scan) -> Result<(), Error> {
        let categories = self.slots[0].projection.dyn_categories();
        let prefix = self.store.config().subject_prefix.clone();
        if until > scan.scanned {
            for r in self
                .fetch_range(format!("{prefix}.>"), scan.scanned + 1, until)
                .await?
            {
                // The subject names the aggregate: no need to decode.
                if let Ok(id) = StreamId::from_subject(&prefix, &r.subject)
                    && categories.contains(&id.category())
                {
                    scan.affected.insert(id.to_string(), id);
                }
            }
            scan.scanned = until;
        }
        let missing: Vec<&StreamId> = scan
            .affected
            .iter()
            .filter(|(k, _)| !scan.read_for.contains(*k))
            .map(|(_, s)| s)
            .collect();
        let mut read = Vec::new();
        if missing.len() > PER_AGGREGATE_READS {
            for category in categories {
                for r in self
                    .fetch_range(format!("{prefix}.{category}.>"), 1, from - 1)
                    .await?
                {
                    // Keep only the affected aggregates' events.
                    let keep = StreamId::from_subject(&prefix, &r.subject)
                        .is_ok_and(|id| scan.affected.contains_key(&id.to_string()));
                    if keep {
                        read.push(r);
                    }
                }
            }
            scan.read_for.extend(scan.affected.keys().cloned());
        } else {
            let mut done = Vec::new();
            for s in missing {
                read.extend(self.fetch_range(s.subject(&prefix), 1, from - 1).await?);
                done.push(s.to_string());
            }
            scan.read_for.extend(done);
        }
        for r in read {
            scan.earlier.insert(r.position, r);
        }
        Ok(())
    }

    pub(crate) async fn redrive(&self) -> Result<RedriveReport, Error> {
        let slot = &self.slots[0];
        let parked: Vec<String> = sqlx::query(
            "SELECT stream FROM sluice_parked WHERE projection = $1 ORDER BY behind_position",
        )
        .bind(slot.key.as_str())
        .fetch_all(self.db.pool())
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
        let mut report = self.redrive_streams(&parked).await?;
        report.remaining = dead_letters(&self.db, &self.slots[0].key).await?;
        Ok(report)
    }

    /// Redrives the dead letters of these parked aggregates, in this order;
    /// `remaining` lists what is still dead of these aggregates.
    pub(crate) async fn redrive_streams(&self, parked: &[String]) -> Result<RedriveReport, Error> {
        let slot = &self.slots[0];
        let mut report = RedriveReport::default();
        for stream in parked {
            let (applied, released) = self.redrive_aggregate(0, stream).await?;
            report.applied.extend(applied);
            if released {
                report.released.push(stream.clone());
            }
        }
        report.remaining = dead_letters(&self.db, &slot.key)
            .await?
            .into_iter()
            .filter(|d| parked.contains(&d.stream))
            .collect();
        if !report.applied.is_empty() {
            let reason = format!("redriven into projection {}", slot.name);
            report.redriven = self.discard_dlq_copies(0, &report.applied, &reason).await;
        }
        Ok(report)
    }

    /// After events were voided (the voided set grew past `seen`): redrives
    /// every parked aggregate with a voided dead letter, so it is released
    /// past it. Returns how many voids are dealt with (`seen` again when the
    /// database failed: the next batch tries again).
    pub(crate) async fn release_voided(&self, seen: usize) -> usize {
        let now = self.voided.len();
        if self.tables != Tables::LIVE {
            // A rebuild skips voided events as it reads them.
            return now;
        }
        for (i, slot) in self.slots.iter().enumerate() {
            let rows = sqlx::query(
                "SELECT d.stream, d.position FROM sluice_dead_letters d \
                 JOIN sluice_parked p ON p.projection = d.projection AND p.stream = d.stream \
                 WHERE d.projection = $1 ORDER BY d.position",
            )
            .bind(slot.key.as_str())
            .fetch_all(self.db.pool())
            .await;
            let rows = match rows {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(projection = slot.name, error = %e, "could not look for voided dead letters; trying again");
                    return seen;
                }
            };
            let mut streams: Vec<String> = Vec::new();
            for row in rows {
                let (Ok(stream), Ok(position)) =
                    (row.try_get::<String, _>(0), row.try_get::<i64, _>(1))
                else {
                    continue;
                };
                if self.voided.contains(to_u64(position)) && !streams.contains(&stream) {
                    streams.push(stream);
                }
            }
            for stream in streams {
                match self.redrive_aggregate(i, &stream).await {
                    Ok((applied, released)) => {
                        tracing::info!(
                            projection = slot.name,
                            stream,
                            applied = applied.len(),
                            released,
                            "parked aggregate redriven after a void"
                        );
                        if !applied.is_empty() {
                            let reason =
                                format!("redriven into projection {} after a void", slot.name);
                            self.discard_dlq_copies(i, &applied, &reason).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(projection = slot.name, stream, error = %e, "could not release a parked aggregate after a void; trying again");
                        return seen;
                    }
                }
            }
        }
        now
    }

    /// Redrives one parked aggregate of member `member`: `(positions
    /// applied, released)`. Voided dead letters are dropped, not applied.
    async fn redrive_aggregate(
        &self,
        member: usize,
        stream: &str,
    ) -> Result<(Vec<u64>, bool), Error> {
        let slot = &self.slots[member];
        // How many of its dead letters to apply: all, until the projection
        // rejects one again (then only those before it).
        let mut cap: Option<(u64, DeadLetterKind, String)> = None;
        // Each pass either commits or lowers the cap: it ends.
        loop {
            let mut tx = self.db.pool().begin().await?;
            // Lock the checkpoint row, as a runner's batch does: the runner
            // applies nothing while the aggregate's fate changes.
            lock_checkpoint(&mut tx, &slot.key).await?;
            let still_parked = sqlx::query(
                "SELECT behind_position FROM sluice_parked WHERE projection = $1 AND stream = $2",
            )
            .bind(slot.key.as_str())
            .bind(stream)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
            if !still_parked {
                tx.rollback().await?;
                return Ok((Vec::new(), false));
            }
            let positions: Vec<u64> = sqlx::query(
                "SELECT position FROM sluice_dead_letters WHERE projection = $1 AND stream = $2 \
                 ORDER BY position",
            )
            .bind(slot.key.as_str())
            .bind(stream)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get::<i64, _>(0).map(to_u64))
            .collect::<Result<_, _>>()?;
            let raws = self.fetch_positions(&positions).await?;
            let mut events: Vec<ProjectedEvent> = Vec::new();
            let mut voided: Vec<u64> = Vec::new();
            let mut stop = cap.clone();
            for r in &raws {
                if stop.as_ref().is_some_and(|(p, _, _)| r.position >= *p) {
                    break;
                }
                if self.voided.contains(r.position) {
                    voided.push(r.position);
                    continue;
                }
                match self.classify(r) {
                    Item::Event(e) => events.push(*e),
                    Item::Bad { reason, .. } => {
                        stop = Some((r.position, DeadLetterKind::Decode, reason));
                        break;
                    }
                    Item::Skip => {
                        stop = Some((
                            r.position,
                            DeadLetterKind::Decode,
                            "not of this projection's categories".to_owned(),
                        ));
                        break;
                    }
                }
            }
            if !events.is_empty() {
                let rejected = slot
                    .projection
                    .dyn_apply(&mut tx, &Tables::LIVE, &events)
                    .await?;
                if let Some(first) = rejected.into_iter().min_by_key(|r| r.position) {
                    // Writes of a rejected batch must not survive: start
                    // over, applying only what comes before it.
                    tx.rollback().await?;
                    cap = Some((first.position, DeadLetterKind::Handler, first.reason));
                    continue;
                }
            }
            let applied: Vec<u64> = events.iter().map(|e| e.position).collect();
            for p in applied.iter().chain(&voided) {
                sqlx::query(
                    "DELETE FROM sluice_dead_letters WHERE projection = $1 AND position = $2",
                )
                .bind(slot.key.as_str())
                .bind(to_i64(*p))
                .execute(&mut *tx)
                .await?;
            }
            let released = match &stop {
                None => {
                    sqlx::query("DELETE FROM sluice_parked WHERE projection = $1 AND stream = $2")
                        .bind(slot.key.as_str())
                        .bind(stream)
                        .execute(&mut *tx)
                        .await?;
                    true
                }
                Some((head, kind, reason)) => {
                    // Still stuck: park it behind the event that fails now,
                    // with today's reason, and the rest behind that one.
                    sqlx::query(
                        "UPDATE sluice_parked SET behind_position = $1 \
                         WHERE projection = $2 AND stream = $3",
                    )
                    .bind(to_i64(*head))
                    .bind(slot.key.as_str())
                    .bind(stream)
                    .execute(&mut *tx)
                    .await?;
                    let behind = format!(
                        "parked behind the dead letter at position {head} of the same aggregate"
                    );
                    sqlx::query(
                        "UPDATE sluice_dead_letters SET kind = CASE WHEN position = $1 THEN $2 ELSE $3 END, \
                         reason = CASE WHEN position = $1 THEN $4 ELSE $5 END \
                         WHERE projection = $6 AND stream = $7",
                    )
                    .bind(to_i64(*head))
                    .bind(kind.as_str())
                    .bind(DeadLetterKind::Parked.as_str())
                    .bind(reason.as_str())
                    .bind(behind.as_str())
                    .bind(slot.key.as_str())
                    .bind(stream)
                    .execute(&mut *tx)
                    .await?;
                    false
                }
            };
            tx.commit().await?;
            tracing::info!(
                projection = slot.name,
                stream,
                applied = applied.len(),
                released,
                "dead letters redriven"
            );
            return Ok((applied.into_iter().chain(voided).collect(), released));
        }
    }

    /// Removes the `DLQ` stream copies of events now applied (audited with
    /// `reason`), so `sluice dlq list` shows only what is still dead; returns
    /// their ids (best effort: the SQL records are what the runtime goes by).
    async fn discard_dlq_copies(&self, member: usize, applied: &[u64], reason: &str) -> Vec<u64> {
        let slot = &self.slots[member];
        let js = self.store.jetstream();
        let mut removed = Vec::new();
        if js.get_stream(DLQ_STREAM).await.is_err() {
            return removed;
        }
        let applied: BTreeSet<u64> = applied.iter().copied().collect();
        let filter = sluice_workers::dlq::Filter {
            consumer: Some(slot.consumer_name.clone()),
            category: None,
            reason: None,
        };
        let listing = match sluice_workers::dlq::list(js, &filter).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(projection = slot.name, error = %e, "could not list the DLQ copies of redriven events");
                return removed;
            }
        };
        for entry in listing.entries {
            if entry.stream != self.store.config().stream || !applied.contains(&entry.sequence) {
                continue;
            }
            match sluice_workers::dlq::remove(js, &entry, "redrive", reason).await {
                Ok(()) => removed.push(entry.id),
                Err(e) => {
                    tracing::warn!(projection = slot.name, id = entry.id, error = %e, "could not remove the DLQ copy of a redriven event");
                }
            }
        }
        removed
    }
}

/// Takes the lock a runner's batch takes (the checkpoint row in PostgreSQL,
/// the write lock in SQLite): until `tx` ends, the checkpoint cannot move
/// and the runner applies nothing.
pub(crate) async fn lock_checkpoint(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    key: &str,
) -> Result<(), Error> {
    sqlx::query("UPDATE sluice_checkpoints SET updated_at_ms = $1 WHERE projection = $2")
        .bind(unix_ms(OffsetDateTime::now_utc()))
        .bind(key)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
