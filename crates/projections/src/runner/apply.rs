//! Applying to the read store: a batch in one transaction with every
//! member's checkpoint (compare-and-set), its dead letters and parking; the
//! halt policy; and the dead letters of a parked aggregate applied again
//! (a redrive, or the release after a void).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::{FailurePolicy, Item, Raw, RunState, Runner};
use crate::bookkeeping::{self, unix_ms};
use crate::db::is_transient;
use crate::dlq::{DLQ_STREAM, DeadLetter, DeadLetterKind};
use crate::error::Error;
use crate::projection::{ProjectedEvent, Rejection, Tables};

/// Permanent failures found so far, per member: position -> (kind, reason).
type Rejected = Vec<BTreeMap<u64, (DeadLetterKind, String)>>;

/// What processing a batch led to.
pub(super) enum Progress {
    /// Applied up to these checkpoints (one per member).
    Advanced(Vec<u64>),
    /// The stored checkpoints moved under us: reopen the feed after them.
    Reopen(Vec<u64>),
    /// Shutdown while blocked.
    Stopped,
}

enum Attempt {
    Committed {
        applied: Vec<usize>,
        dead: Vec<usize>,
    },
    Rejected(usize, Vec<Rejection>),
    Moved(Vec<u64>),
}

impl Runner {
    /// Applies one batch exactly once for every member.
    pub(super) async fn process(
        &self,
        batch: Vec<(Raw, Item)>,
        checkpoints: &[u64],
        shutdown: &CancellationToken,
    ) -> Result<Progress, Error> {
        let (batch, items): (Vec<Raw>, Vec<Item>) = batch.into_iter().unzip();
        let _spans = self.apply_spans(&items);
        let mut rejected: Rejected = vec![BTreeMap::new(); self.slots.len()];
        for (r, item) in batch.iter().zip(&items) {
            if let Item::Bad {
                reason, category, ..
            } = item
            {
                for (i, s) in self.slots.iter().enumerate() {
                    if s.projection.dyn_categories().contains(&category.as_str())
                        && r.position > checkpoints[i]
                    {
                        rejected[i].insert(r.position, (DeadLetterKind::Decode, reason.clone()));
                    }
                }
            }
        }
        let mut backoff = self.backoff();
        // How much of the batch this attempt covers: under `halt`, only the
        // events before the first rejected one are applied.
        let mut len = batch.len();
        let mut halt_at: Option<(usize, u64, String)> = None;
        loop {
            if self.config.failure_policy == FailurePolicy::Halt {
                let first = rejected
                    .iter()
                    .enumerate()
                    .filter_map(|(i, m)| m.iter().next().map(|(p, (_, r))| (*p, i, r.clone())))
                    .min_by_key(|(p, _, _)| *p);
                if let Some((position, member, reason)) = first {
                    halt_at = Some((member, position, reason));
                    len = batch.iter().take_while(|r| r.position < position).count();
                    for m in &mut rejected {
                        m.clear();
                    }
                }
                if len == 0
                    && let Some((member, position, reason)) = &halt_at
                {
                    return Err(self.halt(*member, *position, reason, shutdown).await);
                }
            }
            let (batch, items) = (&batch[..len], &items[..len]);
            match self.attempt(batch, items, checkpoints, &rejected).await {
                Ok(Attempt::Committed { applied, dead }) => {
                    let last = batch.last().map_or(0, |r| r.position);
                    let lag = batch.last().map_or(0, |r| r.pending);
                    let mut new = checkpoints.to_vec();
                    for (i, s) in self.slots.iter().enumerate() {
                        new[i] = new[i].max(last);
                        s.live.update(|l| {
                            if l.dead_letter_blocked {
                                // The DLQ took the letter: running again.
                                l.dead_letter_blocked = false;
                                l.halted = None;
                                l.state = if self.tables == Tables::REBUILD {
                                    RunState::Rebuilding
                                } else {
                                    RunState::Running
                                };
                            }
                            l.checkpoint = new[i];
                            l.applied += applied[i] as u64;
                            l.dead_lettered += dead[i] as u64;
                            l.last_batch = batch.len();
                            l.last_error = None;
                            l.blocked_since = None;
                        });
                    }
                    tracing::debug!(
                        projection = %self.names(),
                        checkpoint = last,
                        ?applied,
                        ?dead,
                        lag,
                        "batch applied"
                    );
                    if let Some((member, position, reason)) = &halt_at {
                        return Err(self.halt(*member, *position, reason, shutdown).await);
                    }
                    return Ok(Progress::Advanced(new));
                }
                Ok(Attempt::Rejected(member, more)) => {
                    for rej in more {
                        tracing::warn!(projection = self.slots[member].name, position = rej.position, reason = %rej.reason, "event rejected");
                        rejected[member]
                            .insert(rej.position, (DeadLetterKind::Handler, rej.reason));
                    }
                }
                Ok(Attempt::Moved(actual)) => {
                    // Another writer (a second runner, a reset, a rebuild
                    // switching in its tables) moved a checkpoint: its writes
                    // count, ours would be duplicates or gaps. Follow it.
                    tracing::warn!(projection = %self.names(), ?checkpoints, ?actual, "checkpoint moved by another writer; following it");
                    return Ok(Progress::Reopen(actual));
                }
                Err(Error::DeadLetters(e)) if e.is_cannot_dead_letter() => {
                    // Never silently: nothing after the event is applied
                    // (the feed is shared, so the whole group waits), the
                    // state, readiness and the halted gauge say why, and
                    // the batch is retried until the DLQ takes the letter.
                    let why = e.to_string();
                    tracing::error!(projection = %self.names(), error = %why, "projection halted: a dead letter cannot be stored; fix the DLQ stream and it resumes by itself");
                    self.update_all(|l| {
                        l.state = RunState::Halted;
                        l.halted = Some(why.clone());
                        l.dead_letter_blocked = true;
                    });
                    if self.pause(shutdown, &mut backoff, &why).await {
                        return Ok(Progress::Stopped);
                    }
                }
                Err(e) => {
                    let transient = match &e {
                        Error::Database(db) => is_transient(db),
                        _ => true,
                    };
                    // Every failure here is the database's or the broker's,
                    // not the event's: block and retry, never skip. A commit
                    // whose answer was lost may have landed: the next
                    // attempt's compare-and-set then fails and the runner
                    // follows the stored checkpoint (no duplicate).
                    tracing::warn!(projection = %self.names(), error = %e, transient, "batch failed; retrying");
                    if self.pause(shutdown, &mut backoff, &e.to_string()).await {
                        return Ok(Progress::Stopped);
                    }
                }
            }
        }
    }

    /// A span per event that carries trace context, child of the span that
    /// appended it: the projection's step of that trace, open until the
    /// batch settles. Events without context get none (a trace of one span
    /// each would be noise, and they cost nothing this way), and neither
    /// does a rebuild (replaying history would add spans to old traces).
    fn apply_spans(&self, items: &[Item]) -> Vec<tracing::Span> {
        if self.tables != Tables::LIVE {
            return Vec::new();
        }
        items
            .iter()
            .filter_map(|item| match item {
                Item::Event(e) if e.envelope.traceparent.is_some() => Some(e),
                _ => None,
            })
            .map(|e| {
                let span = tracing::info_span!(
                    "projection.apply",
                    projection = %self.names(),
                    position = e.position,
                    stream = %e.stream_id,
                    event_type = %e.envelope.event_type,
                );
                sluice_events::trace::set_parent(&span, e.envelope.traceparent.as_deref());
                span
            })
            .collect()
    }

    /// One transaction: move every member's checkpoint (compare-and-set),
    /// apply what each may apply, record dead letters, commit.
    async fn attempt(
        &self,
        batch: &[Raw],
        items: &[Item],
        checkpoints: &[u64],
        rejected: &Rejected,
    ) -> Result<Attempt, Error> {
        let Some(last) = batch.last() else {
            return Ok(Attempt::Moved(checkpoints.to_vec()));
        };
        let now_ms = unix_ms(OffsetDateTime::now_utc());
        let mut tx = self.db.pool().begin().await?;
        // The checkpoint writes come first: they take the row locks
        // (PostgreSQL) or the write lock (SQLite) at once, so two runners of
        // one projection serialize here. In name order, as every other
        // writer of several rows (a group rebuild's switch) takes them, so
        // overlapping groups never deadlock.
        let mut order: Vec<usize> = (0..self.slots.len()).collect();
        order.sort_by(|&a, &b| self.slots[a].key.cmp(&self.slots[b].key));
        for (s, &expected) in order.iter().map(|&i| (&self.slots[i], &checkpoints[i])) {
            if last.position <= expected {
                continue;
            }
            let moved = bookkeeping::advance_checkpoint(
                &mut *tx,
                &s.key,
                expected,
                last.position,
                unix_ms(last.appended_at),
                now_ms,
            )
            .await?;
            if !moved {
                drop(tx);
                return Ok(Attempt::Moved(self.read_checkpoints().await?));
            }
        }
        let mut newly_parked: Vec<Vec<(String, u64)>> = vec![Vec::new(); self.slots.len()];
        let mut dead: Vec<Vec<(DeadLetter<'_>, String)>> =
            (0..self.slots.len()).map(|_| Vec::new()).collect();
        let mut applied = vec![0usize; self.slots.len()];
        let mut shared: Option<(Vec<&ProjectedEvent>, Vec<ProjectedEvent>)> = None;
        for (i, s) in self.slots.iter().enumerate() {
            let categories = s.projection.dyn_categories();
            let mut parked: HashMap<String, u64> = bookkeeping::parked(&mut *tx, &s.key).await?;
            let mut selected: Vec<&ProjectedEvent> = Vec::new();
            for (r, item) in batch.iter().zip(items) {
                if r.position <= checkpoints[i] {
                    continue;
                }
                let Some(category) = item.category() else {
                    continue;
                };
                if !categories.contains(&category) {
                    continue;
                }
                // The common case, without building the aggregate's key:
                // nothing parked, nothing rejected here.
                if let Item::Event(e) = item
                    && parked.is_empty()
                    && !rejected[i].contains_key(&r.position)
                {
                    selected.push(e);
                    continue;
                }
                let (key, event) = match item {
                    Item::Skip => continue,
                    Item::Bad { key, .. } => (key.clone(), None),
                    Item::Event(e) => (e.stream_id.to_string(), Some(e)),
                };
                let letter = |kind, reason: String, behind| DeadLetter {
                    position: r.position,
                    subject: &r.subject,
                    headers: r.headers.as_ref(),
                    payload: &r.payload,
                    kind,
                    reason,
                    behind,
                };
                if let Some(&behind) = parked.get(&key) {
                    let reason = bookkeeping::parked_reason(behind);
                    dead[i].push((letter(DeadLetterKind::Parked, reason, Some(behind)), key));
                } else if let Some((kind, reason)) = rejected[i].get(&r.position) {
                    dead[i].push((letter(*kind, reason.clone(), None), key.clone()));
                    parked.insert(key.clone(), r.position);
                    newly_parked[i].push((key, r.position));
                } else if let Some(e) = event {
                    selected.push(e);
                }
            }
            // Members of a group usually take the same events: copy them
            // once for all of those, not once per member.
            let reuse = matches!(&shared, Some((prev, _))
                if prev.len() == selected.len()
                    && prev.iter().zip(&selected).all(|(a, b)| std::ptr::eq(*a, *b)));
            if !reuse {
                let owned: Vec<ProjectedEvent> = selected.iter().copied().cloned().collect();
                shared = Some((selected, owned));
            }
            let apply: &[ProjectedEvent] = shared.as_ref().map_or(&[], |(_, owned)| owned);
            let rejections = s.projection.dyn_apply(&mut tx, &self.tables, apply).await?;
            if !rejections.is_empty() {
                tx.rollback().await?;
                return Ok(Attempt::Rejected(i, rejections));
            }
            applied[i] = apply.len();
        }
        for (i, s) in self.slots.iter().enumerate() {
            for (key, behind) in &newly_parked[i] {
                bookkeeping::park(&mut *tx, &s.key, key, *behind, now_ms).await?;
            }
            for (d, key) in &dead[i] {
                bookkeeping::record_dead_letter(
                    &mut *tx, &s.key, d.position, key, d.kind, &d.reason, now_ms,
                )
                .await?;
            }
        }
        // Dead letters go out before the commit: if the commit fails the
        // batch is retried and the DLQ dedups the copies by
        // `<stream>:<consumer>:<seq>`; the other order could lose them.
        if self.tables == Tables::LIVE {
            for (i, s) in self.slots.iter().enumerate() {
                for (d, _) in &dead[i] {
                    let events = self.store.config().stream.as_str();
                    sluice_workers::dlq::write(&self.store, d.to_new(&s.consumer_name, events))
                        .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(Attempt::Committed {
            applied,
            dead: dead.iter().map(Vec::len).collect(),
        })
    }

    /// Records the halt (best effort: the database may be what is failing)
    /// and returns the error the runner stops with.
    async fn halt(
        &self,
        member: usize,
        position: u64,
        reason: &str,
        shutdown: &CancellationToken,
    ) -> Error {
        let slot = &self.slots[member];
        tracing::error!(
            projection = slot.name,
            position,
            reason,
            "projection halted by policy"
        );
        for (i, s) in self.slots.iter().enumerate() {
            s.live.update(|l| {
                if i == member {
                    l.state = RunState::Halted;
                    l.halted = Some(format!("position {position}: {reason}"));
                } else {
                    // Its group-mate stopped the shared feed.
                    l.state = RunState::Stopped;
                    l.last_error = Some(format!("stopped with its group: {} halted", slot.name));
                }
            });
        }
        let _ = self
            .retrying(shutdown, "recording the halt", || async {
                bookkeeping::record_halt(self.db.pool(), &slot.key, position, reason)
                    .await
                    .map_err(Error::from)
            })
            .await;
        Error::Halted {
            projection: slot.name.to_owned(),
            position,
            reason: reason.to_owned(),
        }
    }

    /// After events were voided (the voided set grew past `seen`): redrives
    /// every parked aggregate with a voided dead letter, so it is released
    /// past it. Returns how many voids are dealt with (`seen` again when the
    /// database failed: the next batch tries again).
    pub(super) async fn release_voided(&self, seen: usize) -> usize {
        let now = self.voided.len();
        if self.tables != Tables::LIVE {
            // A rebuild skips voided events as it reads them.
            return now;
        }
        for (i, slot) in self.slots.iter().enumerate() {
            let rows = bookkeeping::parked_dead_letters(self.db.pool(), &slot.key).await;
            let rows = match rows {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(projection = slot.name, error = %e, "could not look for voided dead letters; trying again");
                    return seen;
                }
            };
            let mut streams: Vec<String> = Vec::new();
            for (stream, position) in rows {
                if self.voided.contains(position) && !streams.contains(&stream) {
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
    pub(crate) async fn redrive_aggregate(
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
            bookkeeping::lock_checkpoint(&mut tx, &slot.key).await?;
            let still_parked = bookkeeping::parked_head(&mut *tx, &slot.key, stream)
                .await?
                .is_some();
            if !still_parked {
                tx.rollback().await?;
                return Ok((Vec::new(), false));
            }
            let positions = bookkeeping::dead_letter_positions(&mut *tx, &slot.key, stream).await?;
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
                bookkeeping::delete_dead_letter(&mut *tx, &slot.key, *p).await?;
            }
            let released = match &stop {
                None => {
                    bookkeeping::release(&mut *tx, &slot.key, stream).await?;
                    true
                }
                Some((head, kind, reason)) => {
                    // Still stuck: park it behind the event that fails now,
                    // with today's reason, and the rest behind that one.
                    bookkeeping::repark(&mut tx, &slot.key, stream, *head, *kind, reason).await?;
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
    pub(crate) async fn discard_dlq_copies(
        &self,
        member: usize,
        applied: &[u64],
        reason: &str,
    ) -> Vec<u64> {
        let slot = &self.slots[member];
        let store = &self.store;
        let mut removed = Vec::new();
        if store.stream_named(DLQ_STREAM).await.is_err() {
            return removed;
        }
        let applied: BTreeSet<u64> = applied.iter().copied().collect();
        let filter = sluice_workers::dlq::Filter {
            consumer: Some(slot.consumer_name.clone()),
            category: None,
            reason: None,
        };
        let listing = match sluice_workers::dlq::list(store, &filter).await {
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
            match sluice_workers::dlq::remove(store, &entry, "redrive", reason).await {
                Ok(()) => removed.push(entry.id),
                Err(e) => {
                    tracing::warn!(projection = slot.name, id = entry.id, error = %e, "could not remove the DLQ copy of a redriven event");
                }
            }
        }
        removed
    }
}
