//! Partial recovery of a live projection, safe while its runner runs:
//! [`replay`] (undo the events from a position on and let the runner apply
//! them again) and [`redrive`] (apply the events a projection dead-lettered,
//! once their cause is fixed, releasing the aggregates parked behind them;
//! [`redrive_dead_letter`] does it for the aggregate of one `DLQ` entry).
//!
//! Both take their turn through the projection's checkpoint row, like a
//! runner's batch: they lock it first, so a runner's batch commits before or
//! after them, never interleaved. A replay moves the checkpoint back: the
//! runner's next compare-and-set fails and it follows the stored
//! checkpoint, so no event is applied twice or skipped.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;
use sluice_events::{EventStore, StreamId};
use sluice_workers::dlq as wdlq;

use crate::bookkeeping::{self, DeadLetterRecord, dead_letters, read_checkpoint};
use crate::db::Database;
use crate::error::Error;
use crate::projection::{ProjectedEvent, RewindSupport, Tables};
use crate::runner::{Item, Member, Raw, Runner, RunnerConfig};

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
    let entry = match wdlq::show(&store, id).await {
        Ok(e) => e,
        Err(sluice_workers::Error::NotFound(id)) => {
            let trail = wdlq::audit_trail(&store, id).await?;
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
    let stream = bookkeeping::dead_letter_parking(db.pool(), name, entry.sequence).await?;
    let Some((stream, head)) = stream else {
        // The projection has no record of it (applied by an earlier redrive
        // or a replay): only the copy is left over.
        wdlq::remove(
            &store,
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
            &store,
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
        bookkeeping::lock_checkpoint(&mut tx, &slot.key).await?;
        let checkpoint = bookkeeping::checkpoint(&mut *tx, &slot.key).await?;
        if from > checkpoint + 1 {
            tx.rollback().await?;
            return Err(out_of_range(checkpoint));
        }
        if support == RewindSupport::ByAggregate {
            self.scan_aggregates(from, checkpoint, &mut scan).await?;
        }
        bookkeeping::rewind_checkpoint(&mut *tx, &slot.key, from - 1).await?;
        let aggregates: Vec<StreamId> = scan.affected.values().cloned().collect();
        slot.projection
            .dyn_rewind(&mut tx, &Tables::LIVE, from, &aggregates)
            .await?;
        if support == RewindSupport::ByAggregate && !aggregates.is_empty() {
            // Events it dead-lettered stay unapplied.
            let dead: HashSet<u64> =
                bookkeeping::dead_letters_before(&mut *tx, &slot.key, from).await?;
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
        let cleared = bookkeeping::forget_records_from(&mut tx, &slot.key, from).await?;
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
        let parked = bookkeeping::parked_streams(self.db.pool(), &slot.key).await?;
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
}
