//! Group commit: concurrent appends to different aggregates share one
//! JetStream atomic batch, so one fsync (with `sync_interval: always`) covers
//! many appends.
//!
//! Shape: [`crate::EventStore::append`] validates and encodes, then hands an
//! [`Append`] to a bounded queue. One dispatcher task takes appends off the
//! queue into batches ([`take_batch`]: never two appends of one aggregate,
//! at most `max_batch_events` messages and `max_batch_bytes`), and runs each
//! batch in its own task, up to `max_in_flight` at a time. A partial batch
//! waits for the batch in flight, then (up to the linger) for that batch's
//! writers to come back, so batches grow with the load ([`next_step`]); an
//! append on an idle store goes out at once, alone.
//!
//! Outcomes stay per append: each aggregate's first message in the batch
//! carries its own `Nats-Expected-Last-Subject-Sequence` (nats-server 2.12+
//! checks it on any message of a batch). When the server refuses the batch
//! with "wrong last sequence" it does not say which aggregate, so the
//! appends with an expectation are checked one by one against the
//! aggregate's current last sequence: stale ones get [`Error::Conflict`]
//! (unless the events there are their own, from an earlier try), the others
//! go out again in a new batch. Anything the batch path cannot decide
//! exactly (duplicate ids, unknown server errors, a batch that keeps
//! failing) is handed to the one-append-at-a-time path, whose outcomes are
//! exact by construction.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::config::{GroupCommitConfig, MAX_BATCH};
use super::publish::{Append, Attempt, Publisher};
use super::stats::Counters;
use super::types::{AppendResult, ExpectedVersion};
use crate::error::Error;

/// How often a batch refused for someone else's stale expectation is split
/// and retried before its remaining appends go out one by one.
const MAX_SPLIT_ROUNDS: usize = 3;

/// What [`take_batch`] needs to know about a queued item.
pub(super) trait Batchable {
    /// The aggregate (subject): two items with the same key never share a batch.
    fn key(&self) -> &str;
    /// Messages the item adds to a batch.
    fn events(&self) -> usize;
    /// Bytes the item adds to a batch.
    fn bytes(&self) -> usize;
}

/// Size limits of one batch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) max_events: usize,
    pub(super) max_bytes: usize,
}

/// Takes the next batch off `pending`, oldest first: items whose aggregate is
/// already in the batch, or that would overflow it, stay queued in their
/// order (so an aggregate's appends keep their arrival order). The first
/// item is always taken, even alone over the limits, so nothing is stuck.
pub(super) fn take_batch<T: Batchable>(pending: &mut VecDeque<T>, limits: Limits) -> Vec<T> {
    let mut batch = Vec::new();
    let mut keys: HashSet<String> = HashSet::new();
    let (mut events, mut bytes) = (0usize, 0usize);
    let mut kept = VecDeque::with_capacity(pending.len());
    while let Some(item) = pending.pop_front() {
        if events >= limits.max_events {
            kept.push_back(item);
            kept.extend(pending.drain(..));
            break;
        }
        let fits = batch.is_empty()
            || (events + item.events() <= limits.max_events
                && bytes + item.bytes() <= limits.max_bytes);
        if fits && !keys.contains(item.key()) {
            keys.insert(item.key().to_owned());
            events += item.events();
            bytes += item.bytes();
            batch.push(item);
        } else {
            kept.push_back(item);
        }
    }
    *pending = kept;
    batch
}

/// Where each append of a committed batch landed, from the server's ack
/// (`seq` of the last message, `count` messages, stored contiguously).
/// `None` when the ack does not match the batch that was sent.
pub(super) fn assign_positions(
    last_seq: u64,
    count: u64,
    sizes: &[usize],
) -> Option<Vec<Vec<u64>>> {
    let total: u64 = sizes.iter().map(|&s| s as u64).sum();
    if count != total || total == 0 || last_seq < total {
        return None;
    }
    let mut next = last_seq + 1 - total;
    Some(
        sizes
            .iter()
            .map(|&s| {
                let positions: Vec<u64> = (next..next + s as u64).collect();
                next += s as u64;
                positions
            })
            .collect(),
    )
}

/// After the server refused a batch for a wrong last sequence: is this
/// append's expectation the stale one? Appends without expectation never are.
pub(super) fn is_stale(expected: Option<u64>, actual_last: u64) -> bool {
    matches!(expected, Some(e) if e != actual_last)
}

/// An append waiting for its batch, with the caller's answer slot.
pub(super) struct Pending {
    pub(super) append: Append,
    reply: oneshot::Sender<Result<AppendResult, Error>>,
}

impl Pending {
    fn answer(self, counters: &Counters, result: Result<AppendResult, Error>) {
        counters.answered();
        // The caller may have gone away (dropped future); the append's
        // outcome stands regardless.
        let _ = self.reply.send(result);
    }
}

impl Batchable for Pending {
    fn key(&self) -> &str {
        &self.append.subject
    }
    fn events(&self) -> usize {
        self.append.events.len()
    }
    fn bytes(&self) -> usize {
        self.append.bytes
    }
}

/// The caller's end of the queue. Dropping the last clone of the store drops
/// it, which lets the dispatcher finish what is queued and stop.
#[derive(Debug)]
pub(super) struct Appender {
    tx: mpsc::Sender<Pending>,
    queue_timeout: Duration,
    capacity: usize,
}

impl Appender {
    /// Starts the dispatcher task on the current runtime.
    pub(super) fn start(
        publisher: Arc<Publisher>,
        config: &GroupCommitConfig,
        server_max_payload: usize,
    ) -> Self {
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let limits = Limits {
            max_events: config.max_batch_events.clamp(1, MAX_BATCH),
            max_bytes: config.max_batch_bytes.min(server_max_payload.max(1)),
        };
        tracing::debug!(
            max_events = limits.max_events,
            max_bytes = limits.max_bytes,
            linger = ?config.linger,
            max_in_flight = config.max_in_flight,
            "group commit started"
        );
        tokio::spawn(dispatch(publisher, rx, config.clone(), limits));
        Self {
            tx,
            queue_timeout: config.queue_timeout,
            capacity: config.queue_capacity,
        }
    }

    /// Queues the append and waits for its outcome.
    pub(super) async fn submit(
        &self,
        publisher: &Publisher,
        append: Append,
    ) -> Result<AppendResult, Error> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending { append, reply };
        publisher.counters.accepted();
        let sent = self.tx.send_timeout(pending, self.queue_timeout).await;
        if sent.is_err() {
            publisher.counters.answered();
        }
        match sent {
            Ok(()) => {}
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                publisher.counters.queue_timed_out();
                tracing::warn!(waited = ?self.queue_timeout, capacity = self.capacity, "append queue full");
                return Err(Error::Overloaded {
                    waited: self.queue_timeout,
                    capacity: self.capacity,
                });
            }
            Err(mpsc::error::SendTimeoutError::Closed(p)) => {
                // The dispatcher is gone (runtime shutting down): write directly.
                return publisher.append_direct(&p.append).await;
            }
        }
        answer
            .await
            .map_err(|_| Error::Nats("group commit stopped before answering; the append may or may not have landed, retry it with the same event ids".to_owned()))?
    }
}

/// Moves whatever is queued right now into `pending`, up to `cap` items.
/// Returns false once the queue is closed and empty.
fn drain(rx: &mut mpsc::Receiver<Pending>, pending: &mut VecDeque<Pending>, cap: usize) -> bool {
    while pending.len() < cap {
        match rx.try_recv() {
            Ok(p) => pending.push_back(p),
            Err(mpsc::error::TryRecvError::Empty) => return true,
            Err(mpsc::error::TryRecvError::Disconnected) => return false,
        }
    }
    true
}

/// What the dispatcher does next with the batch it is gathering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Send it now.
    Send,
    /// Wait until the batches in flight are done (or the batch is full).
    WaitForInFlight,
    /// Wait up to the linger for this many appends.
    Linger(usize),
}

/// The gathering rule. nats-server writes atomic batches one after another
/// at a fixed cost each (on an R1 file stream it stages every batch in a
/// file store of its own: measured ~2.5 ms, the cost of ~20 fsyncs here), so
/// two half batches cost twice one full batch:
/// - a full batch goes at once (that is when several batches are in flight);
/// - a partial batch waits for the batch in flight, whose writers are then
///   about to come back with their next append;
/// - right after a batch finished, wait (up to the linger) for as many
///   appends as it held: its writers coming back;
/// - otherwise (idle) send at once: an idle append is never delayed.
///
/// `recent_appends` is the size of the batch that finished within the last
/// linger, 0 when none did.
pub(super) fn next_step(
    queued_appends: usize,
    queued_events: usize,
    others_in_flight: bool,
    recent_appends: usize,
    max_events: usize,
) -> Next {
    if queued_events >= max_events {
        Next::Send
    } else if others_in_flight {
        Next::WaitForInFlight
    } else if recent_appends.min(max_events) > queued_appends {
        Next::Linger(recent_appends.min(max_events))
    } else {
        Next::Send
    }
}

/// The last finished batch, shared between the batch tasks and the dispatcher.
struct Recent {
    epoch: tokio::time::Instant,
    appends: AtomicU64,
    /// Microseconds after `epoch`; 0 = never.
    done_at_us: AtomicU64,
    done: tokio::sync::Notify,
}

impl Recent {
    fn finished(&self, appends: usize) {
        self.appends.store(appends as u64, Ordering::Relaxed);
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.done_at_us.store(now.max(1), Ordering::Relaxed);
        self.done.notify_waiters();
    }

    /// Appends of the batch that finished within `window`, else 0.
    fn appends_within(&self, window: Duration) -> usize {
        let done = self.done_at_us.load(Ordering::Relaxed);
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let window = u64::try_from(window.as_micros()).unwrap_or(u64::MAX);
        if done == 0 || now.saturating_sub(done) > window {
            0
        } else {
            self.appends.load(Ordering::Relaxed) as usize
        }
    }
}

/// Frees the batch's in-flight slot and wakes the dispatcher when the batch
/// task ends, also if it panics, so the dispatcher never waits for a batch
/// that is gone.
struct BatchDone {
    recent: Arc<Recent>,
    appends: usize,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for BatchDone {
    fn drop(&mut self) {
        // The slot first: the dispatcher, once woken, checks the free slots.
        drop(self.slot.take());
        self.recent.finished(self.appends);
    }
}

/// Receives one more append into `pending` (plus whatever else is queued).
/// Returns false once the queue is closed.
fn accept(
    p: Option<Pending>,
    rx: &mut mpsc::Receiver<Pending>,
    pending: &mut VecDeque<Pending>,
    cap: usize,
) -> bool {
    match p {
        Some(p) => {
            pending.push_back(p);
            drain(rx, pending, cap)
        }
        None => false,
    }
}

async fn dispatch(
    publisher: Arc<Publisher>,
    mut rx: mpsc::Receiver<Pending>,
    config: GroupCommitConfig,
    limits: Limits,
) {
    let slots = Arc::new(Semaphore::new(config.max_in_flight));
    let recent = Arc::new(Recent {
        epoch: tokio::time::Instant::now(),
        appends: AtomicU64::new(0),
        done_at_us: AtomicU64::new(0),
        done: tokio::sync::Notify::new(),
    });
    let mut pending: VecDeque<Pending> = VecDeque::new();
    // Bound what the dispatcher holds outside the queue, so the queue's
    // capacity stays the real bound on memory and waiting callers.
    let cap = limits.max_events.max(64);
    let mut open = true;
    loop {
        if pending.is_empty() {
            if !open {
                break;
            }
            match rx.recv().await {
                Some(p) => pending.push_back(p),
                None => break,
            }
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        open = drain(&mut rx, &mut pending, cap) && open;
        loop {
            let queued_events: usize = pending.iter().map(Batchable::events).sum();
            // Registered before the check, so a batch finishing in between
            // still wakes us.
            let finished = recent.done.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            let others_in_flight = slots.available_permits() + 1 < config.max_in_flight;
            let step = next_step(
                pending.len(),
                queued_events,
                others_in_flight,
                recent.appends_within(config.linger),
                limits.max_events,
            );
            match step {
                _ if !open || pending.len() >= cap => break,
                Next::Send => break,
                Next::WaitForInFlight => {
                    tokio::select! {
                        p = rx.recv() => open = accept(p, &mut rx, &mut pending, cap),
                        _ = &mut finished => {}
                    }
                }
                Next::Linger(target) => {
                    if config.linger.is_zero() {
                        break;
                    }
                    publisher.counters.batch_lingered();
                    let deadline = tokio::time::Instant::now() + config.linger;
                    while open && pending.len() < target.min(cap) {
                        match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(p) => open = accept(p, &mut rx, &mut pending, cap),
                            Err(_) => {
                                publisher.counters.linger_ran_out();
                                break;
                            }
                        }
                    }
                    break;
                }
            }
        }
        let batch = take_batch(&mut pending, limits);
        let publisher = publisher.clone();
        let done = BatchDone {
            recent: recent.clone(),
            appends: batch.len(),
            slot: Some(slot),
        };
        tokio::spawn(async move {
            run_batch(&publisher, batch).await;
            drop(done);
        });
    }
    tracing::debug!("group commit stopped");
}

/// Writes one batch and answers every append in it exactly.
async fn run_batch(publisher: &Publisher, mut todo: Vec<Pending>) {
    for round in 0.. {
        if todo.len() < publisher.config.group_commit.min_batch_appends.max(2) {
            // A lone append, or a handful: an atomic batch has a fixed server
            // cost that a few concurrent single writes undercut, and the
            // single path's outcomes are exact as they are.
            one_by_one(publisher, todo, false).await;
            return;
        }
        if publisher.atomic_disabled() {
            one_by_one(publisher, todo, true).await;
            return;
        }
        let appends: Vec<&Append> = todo.iter().map(|p| &p.append).collect();
        let result = publisher.publish_group(&appends).await;
        match result {
            Ok((last_seq, count)) => {
                let sizes: Vec<usize> = todo.iter().map(|p| p.append.events.len()).collect();
                let Some(positions) = assign_positions(last_seq, count, &sizes) else {
                    // Cannot happen with a conforming server; the events did
                    // land, so find them rather than guess.
                    tracing::error!(
                        last_seq,
                        count,
                        expected = sizes.iter().sum::<usize>(),
                        "batch ack does not match the batch sent; locating each append"
                    );
                    for p in todo {
                        let r = publisher
                            .find_landed(&p.append.subject, &p.append.events)
                            .await
                            .and_then(|found| {
                                found.ok_or_else(|| {
                                    Error::Nats(
                                        "batch acknowledged but its events were not found"
                                            .to_owned(),
                                    )
                                })
                            });
                        p.answer(&publisher.counters, r);
                    }
                    return;
                };
                publisher.counters.committed(todo.len(), sizes.iter().sum());
                for (p, positions) in todo.into_iter().zip(positions) {
                    let version = positions.last().copied().unwrap_or_default();
                    p.answer(
                        &publisher.counters,
                        Ok(AppendResult {
                            version,
                            positions,
                            deduplicated: false,
                        }),
                    );
                }
                return;
            }
            Err(Attempt::WrongLast) if round < MAX_SPLIT_ROUNDS => {
                match split_stale(publisher, todo).await {
                    Some(innocent) => {
                        publisher.counters.requeued(innocent.len());
                        todo = innocent;
                    }
                    None => return,
                }
            }
            Err(Attempt::Transient(msg)) => {
                // Same answer as a lone append that exhausted its retries: the
                // outcome is unknown, and a retry with the same ids is safe.
                tracing::error!(appends = todo.len(), error = %msg, "batch gave up after retries");
                for p in todo {
                    p.answer(
                        &publisher.counters,
                        Err(Error::Timeout(publisher.config.request_timeout)),
                    );
                }
                return;
            }
            Err(Attempt::AtomicDisabled) => {
                publisher.disable_atomic();
                one_by_one(publisher, todo, true).await;
                return;
            }
            Err(other) => {
                // Duplicate ids (a retry of a batch that had landed, or ids
                // reused by the caller), an error we do not know, or a batch
                // that keeps failing: the single path decides exactly.
                tracing::debug!(appends = todo.len(), reason = ?other, "batch outcome not decidable as a whole; appending one by one");
                one_by_one(publisher, todo, true).await;
                return;
            }
        }
    }
}

/// Answers the appends whose expectation is stale and returns the others to
/// go out again, or `None` when all were answered here.
async fn split_stale(publisher: &Publisher, todo: Vec<Pending>) -> Option<Vec<Pending>> {
    let lasts = futures::future::join_all(todo.iter().map(|p| async {
        match p.append.expected {
            ExpectedVersion::Any => Ok(None),
            _ => publisher.last_version_of(&p.append.subject).await.map(Some),
        }
    }))
    .await;
    let mut innocent = Vec::new();
    let mut stale = Vec::new();
    let mut unsure = Vec::new();
    for (p, last) in todo.into_iter().zip(lasts) {
        match last {
            Ok(Some(last)) if is_stale(p.append.expected.as_sequence(), last) => stale.push(p),
            Ok(_) => innocent.push(p),
            Err(_) => unsure.push(p),
        }
    }
    if stale.is_empty() {
        // The server saw a stale expectation we cannot find (or could not
        // check): let each append find out on its own.
        tracing::debug!(
            appends = innocent.len() + unsure.len(),
            "no stale append found in a refused batch; appending one by one"
        );
        innocent.extend(unsure);
        one_by_one(publisher, innocent, true).await;
        return None;
    }
    publisher.counters.batch_split();
    tracing::debug!(
        stale = stale.len(),
        innocent = innocent.len(),
        "batch refused for a stale expectation; splitting"
    );
    let resolve = futures::future::join_all(stale.into_iter().map(|p| async move {
        let a = &p.append;
        let expected = a.expected.as_sequence().unwrap_or(0);
        let r = publisher
            .resolve_wrong_last(&a.stream_id, &a.subject, expected, &a.events)
            .await
            .and_then(|r| r);
        publisher.counters.conflict_resolved();
        p.answer(&publisher.counters, r);
    }));
    let unsure_done = one_by_one(publisher, unsure, true);
    tokio::join!(resolve, unsure_done);
    if innocent.is_empty() {
        None
    } else {
        Some(innocent)
    }
}

/// Each append on its own, concurrently, through the exact direct path.
async fn one_by_one(publisher: &Publisher, todo: Vec<Pending>, fallback: bool) {
    if fallback {
        publisher.counters.single_fallbacks(todo.len());
    }
    futures::future::join_all(todo.into_iter().map(|p| async move {
        let r = publisher.append_direct(&p.append).await;
        p.answer(&publisher.counters, r);
    }))
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Item(&'static str, usize, usize);

    impl Batchable for Item {
        fn key(&self) -> &str {
            self.0
        }
        fn events(&self) -> usize {
            self.1
        }
        fn bytes(&self) -> usize {
            self.2
        }
    }

    const ROOMY: Limits = Limits {
        max_events: 1000,
        max_bytes: 1 << 20,
    };

    fn keys(items: &[Item]) -> Vec<&'static str> {
        items.iter().map(|i| i.0).collect()
    }

    #[test]
    fn same_aggregate_never_shares_a_batch_and_keeps_its_order() {
        let mut q: VecDeque<Item> = [
            Item("a", 1, 10),
            Item("b", 1, 10),
            Item("a", 2, 10),
            Item("c", 1, 10),
            Item("a", 3, 10),
        ]
        .into();
        let first = take_batch(&mut q, ROOMY);
        assert_eq!(keys(&first), ["a", "b", "c"]);
        assert_eq!(q, VecDeque::from([Item("a", 2, 10), Item("a", 3, 10)]));
        let second = take_batch(&mut q, ROOMY);
        assert_eq!(second, [Item("a", 2, 10)]);
        let third = take_batch(&mut q, ROOMY);
        assert_eq!(third, [Item("a", 3, 10)]);
        assert!(q.is_empty());
        assert!(take_batch(&mut q, ROOMY).is_empty());
    }

    #[test]
    fn batches_respect_event_and_byte_limits() {
        let limits = Limits {
            max_events: 5,
            max_bytes: 100,
        };
        let mut q: VecDeque<Item> = [
            Item("a", 3, 10),
            Item("b", 3, 10),
            Item("c", 2, 10),
            Item("d", 1, 10),
        ]
        .into();
        // b would overflow the event limit; c fills it; d waits.
        assert_eq!(keys(&take_batch(&mut q, limits)), ["a", "c"]);
        assert_eq!(keys(&take_batch(&mut q, limits)), ["b", "d"]);

        let mut q: VecDeque<Item> = [Item("a", 1, 60), Item("b", 1, 60), Item("c", 1, 40)].into();
        assert_eq!(keys(&take_batch(&mut q, limits)), ["a", "c"]);
        assert_eq!(keys(&take_batch(&mut q, limits)), ["b"]);
    }

    #[test]
    fn an_oversized_append_goes_alone_instead_of_getting_stuck() {
        let limits = Limits {
            max_events: 5,
            max_bytes: 100,
        };
        let mut q: VecDeque<Item> = [Item("big", 9, 500), Item("b", 1, 1)].into();
        assert_eq!(keys(&take_batch(&mut q, limits)), ["big"]);
        assert_eq!(keys(&take_batch(&mut q, limits)), ["b"]);
    }

    #[test]
    fn a_full_batch_stops_scanning_and_keeps_the_rest_in_order() {
        let limits = Limits {
            max_events: 2,
            max_bytes: 1000,
        };
        let mut q: VecDeque<Item> = [
            Item("a", 1, 1),
            Item("b", 1, 1),
            Item("c", 1, 1),
            Item("d", 1, 1),
        ]
        .into();
        assert_eq!(keys(&take_batch(&mut q, limits)), ["a", "b"]);
        assert_eq!(
            keys(&q.iter().map(|i| Item(i.0, i.1, i.2)).collect::<Vec<_>>()),
            ["c", "d"]
        );
    }

    #[test]
    fn positions_are_handed_out_in_batch_order() {
        assert_eq!(
            assign_positions(10, 6, &[1, 3, 2]),
            Some(vec![vec![5], vec![6, 7, 8], vec![9, 10]])
        );
        assert_eq!(assign_positions(10, 5, &[1, 3, 2]), None, "count mismatch");
        assert_eq!(assign_positions(2, 6, &[1, 3, 2]), None, "impossible seq");
        assert_eq!(assign_positions(1, 1, &[1]), Some(vec![vec![1]]));
    }

    #[test]
    fn gathering_waits_for_writers_coming_back_but_never_when_idle() {
        // Idle: nothing in flight, no batch just finished: send at once.
        assert_eq!(next_step(1, 1, false, 0, 1000), Next::Send);
        // A partial batch waits for the batch in flight ...
        assert_eq!(next_step(5, 5, true, 0, 1000), Next::WaitForInFlight);
        // ... but a full one is pipelined.
        assert_eq!(next_step(900, 1000, true, 0, 1000), Next::Send);
        // Right after a batch of 64 finished: wait for its writers.
        assert_eq!(next_step(3, 3, false, 64, 1000), Next::Linger(64));
        assert_eq!(next_step(64, 64, false, 64, 1000), Next::Send);
        // A lone sequential writer: its last batch held one append.
        assert_eq!(next_step(1, 1, false, 1, 1000), Next::Send);
        // The target never exceeds a batch.
        assert_eq!(next_step(10, 10, false, 5000, 1000), Next::Linger(1000));
    }

    #[test]
    fn only_a_differing_expectation_is_stale() {
        assert!(!is_stale(None, 7), "Any never conflicts");
        assert!(!is_stale(Some(7), 7), "still right: innocent");
        assert!(is_stale(Some(0), 7), "expected no stream");
        assert!(is_stale(Some(6), 7));
    }
}
