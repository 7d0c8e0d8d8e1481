//! One lane's bookkeeping, kept free of I/O so the ordering rules are unit
//! tested: per subject, messages run one at a time in stream order; a subject
//! waiting for a delayed retry holds its later messages; redelivered messages
//! settle before running (a crashed replica's redeliveries come in expiry
//! order, not stream order); duplicates and late predecessors are told apart.
//!
//! What a lane remembers lives in memory only. After a restart it knows
//! nothing, so an event an earlier process handled but never saw
//! acknowledged comes back as *late* (behind newer events of its aggregate)
//! or as new; either way the handler, idempotent by durable state, is what
//! recognises it ([`LaneState::new`]'s `handle_late`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

/// What the lane needs to know about a message.
pub(crate) trait Queued {
    /// The original event's subject (the aggregate).
    fn subject(&self) -> &str;
    /// The original event's stream sequence.
    fn seq(&self) -> u64;
    /// The server's delivery count of this message.
    fn delivered(&self) -> u64;
    /// A live event (not a redriven dead letter).
    fn is_live(&self) -> bool;
}

/// How a handled message ended, as far as its lane cares.
pub(crate) enum Step {
    /// Finished (acked, dead-lettered, parked or skipped).
    Done,
    /// Negatively acknowledged: the subject waits for its redelivery.
    Retrying(Duration),
}

/// Messages of one subject inside a lane, in stream order.
struct SubjectQueue<T> {
    pending: BTreeMap<u64, T>,
    /// Waiting for the redelivery of this sequence (a delayed retry) until
    /// the deadline; later messages of the subject are held meanwhile.
    waiting: Option<(u64, Instant)>,
    /// Redeliveries of a crashed replica's messages arrive in the order they
    /// expired, not in stream order: hold the subject until this instant so
    /// its redelivered messages gather and are sorted before any is handled.
    settle_until: Option<Instant>,
}

/// What to do with a message arriving in a lane.
pub(crate) enum Arrival<T> {
    /// Queued for handling.
    Queued,
    /// A redelivery of a message this lane already handled: ack it again.
    Duplicate(T),
    /// An earlier event of a subject arriving after a later one was handled
    /// (the server redelivered out of order), to be dead-lettered: the lane
    /// was told not to hand late events to the handler.
    Late(T),
    /// Such a late event, queued for the handler (which is idempotent by
    /// durable state) ahead of the subject's other queued messages.
    QueuedLate { subject: String, seq: u64 },
}

pub(crate) struct LaneState<T> {
    queues: HashMap<String, SubjectQueue<T>>,
    /// Subjects that may have a runnable message.
    ready: VecDeque<String>,
    /// Highest live stream sequence handled per subject.
    done: HashMap<String, u64>,
    /// Recently handled live stream sequences (bounded, oldest evicted):
    /// tells a duplicate redelivery from a late predecessor.
    handled: HashSet<u64>,
    handled_order: VecDeque<u64>,
    settle: Duration,
    /// Hand late events to the handler instead of reporting them `Late`.
    handle_late: bool,
}

/// How many handled sequences and subjects a lane remembers.
const MEMORY_LIMIT: usize = 100_000;

impl<T: Queued> LaneState<T> {
    /// `handle_late`: a late event (earlier than one this lane handled, and
    /// not known as handled here) is queued for the handler rather than
    /// returned as [`Arrival::Late`].
    pub(crate) fn new(settle: Duration, handle_late: bool) -> Self {
        Self {
            queues: HashMap::new(),
            ready: VecDeque::new(),
            done: HashMap::new(),
            handled: HashSet::new(),
            handled_order: VecDeque::new(),
            settle,
            handle_late,
        }
    }

    pub(crate) fn enqueue(&mut self, m: T) -> Arrival<T> {
        let mut late = false;
        if m.is_live() {
            if self.handled.contains(&m.seq()) {
                return Arrival::Duplicate(m);
            }
            if self.done.get(m.subject()).is_some_and(|d| m.seq() < *d) {
                if !self.handle_late {
                    return Arrival::Late(m);
                }
                late = true;
            }
        }
        let (subject, seq) = (m.subject().to_owned(), m.seq());
        let q = self.queues.entry(m.subject().to_owned()).or_default();
        let awaited = q.waiting.is_some_and(|(seq, _)| seq == m.seq());
        if m.delivered() > 1 && !awaited {
            q.settle_until = Some(Instant::now() + self.settle);
        }
        // A newer delivery of a queued message replaces it (fresh ack subject).
        q.pending.insert(m.seq(), m);
        self.ready.push_back(subject.clone());
        if late {
            Arrival::QueuedLate { subject, seq }
        } else {
            Arrival::Queued
        }
    }

    /// The next message to handle, or when to look again (a settling subject).
    pub(crate) fn next_runnable(&mut self) -> (Option<T>, Option<Instant>) {
        let now = Instant::now();
        let mut wake: Option<Instant> = None;
        let mut settling = Vec::new();
        let mut found = None;
        while let Some(subject) = self.ready.pop_front() {
            let Some(q) = self.queues.get_mut(&subject) else {
                continue;
            };
            if let Some(until) = q.settle_until {
                if until > now {
                    wake = Some(wake.map_or(until, |w| w.min(until)));
                    settling.push(subject);
                    continue;
                }
                q.settle_until = None;
            }
            let next = match q.waiting {
                Some((seq, _)) => q.pending.remove(&seq),
                None => q.pending.pop_first().map(|(_, m)| m),
            };
            if let Some(m) = next {
                q.waiting = None;
                found = Some(m);
                break;
            }
            if q.pending.is_empty() && q.waiting.is_none() {
                self.queues.remove(&subject);
            }
        }
        for s in settling.into_iter().rev() {
            self.ready.push_front(s);
        }
        (found, wake)
    }

    pub(crate) fn finished(
        &mut self,
        subject: &str,
        seq: u64,
        live: bool,
        step: Step,
        ack_wait: Duration,
    ) {
        match step {
            Step::Done => {
                if live {
                    if self.done.len() > MEMORY_LIMIT {
                        self.done.clear();
                    }
                    match self.done.get_mut(subject) {
                        Some(d) => *d = (*d).max(seq),
                        None => {
                            self.done.insert(subject.to_owned(), seq);
                        }
                    }
                    if self.handled.insert(seq) {
                        self.handled_order.push_back(seq);
                    }
                    while self.handled_order.len() > MEMORY_LIMIT {
                        if let Some(old) = self.handled_order.pop_front() {
                            self.handled.remove(&old);
                        }
                    }
                }
            }
            Step::Retrying(delay) => {
                let q = self.queues.entry(subject.to_owned()).or_default();
                q.waiting = Some((seq, Instant::now() + delay + ack_wait * 2));
            }
        }
        if self
            .queues
            .get(subject)
            .is_some_and(|q| !q.pending.is_empty())
        {
            self.ready.push_back(subject.to_owned());
        }
    }

    /// Gives up waiting for redeliveries that never came (the message went to
    /// another replica, or the server gave up on it): the held messages are
    /// dropped unacked, so the server redelivers them after the ack wait,
    /// behind the one we waited for.
    pub(crate) fn expire_waits(&mut self, worker: &str) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| q.waiting.is_some_and(|(_, deadline)| deadline <= now))
            .map(|(s, _)| s.clone())
            .collect();
        for subject in expired {
            if let Some(q) = self.queues.remove(&subject) {
                tracing::warn!(worker, subject = %subject, held = q.pending.len(), "retry redelivery did not come back; releasing held messages to the server");
            }
        }
    }
}

impl<T> Default for SubjectQueue<T> {
    fn default() -> Self {
        Self {
            pending: BTreeMap::new(),
            waiting: None,
            settle_until: None,
        }
    }
}

impl<T> LaneState<T> {
    /// Every queued (not running) message, for in-progress acks.
    pub(crate) fn queued(&self) -> impl Iterator<Item = &T> {
        self.queues.values().flat_map(|q| q.pending.values())
    }

    /// Queued messages of subjects not waiting for a delayed retry, in
    /// stream order per subject: safe to hand back to the server at once.
    pub(crate) fn handback(&self) -> impl Iterator<Item = &T> {
        self.queues
            .values()
            .filter(|q| q.waiting.is_none())
            .flat_map(|q| q.pending.values())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct M {
        subject: &'static str,
        seq: u64,
        delivered: u64,
        live: bool,
    }

    impl Queued for M {
        fn subject(&self) -> &str {
            self.subject
        }
        fn seq(&self) -> u64 {
            self.seq
        }
        fn delivered(&self) -> u64 {
            self.delivered
        }
        fn is_live(&self) -> bool {
            self.live
        }
    }

    fn live(subject: &'static str, seq: u64, delivered: u64) -> M {
        M {
            subject,
            seq,
            delivered,
            live: true,
        }
    }

    const SETTLE: Duration = Duration::from_millis(500);
    const ACK_WAIT: Duration = Duration::from_secs(2);

    fn queue(state: &mut LaneState<M>, m: M) {
        assert!(matches!(state.enqueue(m), Arrival::Queued));
    }

    /// Runs everything runnable now, each finishing `Done`; returns the order.
    fn drain(state: &mut LaneState<M>) -> Vec<(&'static str, u64)> {
        let mut out = Vec::new();
        while let (Some(m), _) = state.next_runnable() {
            out.push((m.subject, m.seq));
            state.finished(m.subject, m.seq, m.live, Step::Done, ACK_WAIT);
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn each_subject_runs_in_stream_order() {
        let mut s = LaneState::new(SETTLE, false);
        for (subject, seq) in [("a", 5), ("a", 3), ("b", 1), ("a", 4), ("b", 2)] {
            queue(&mut s, live(subject, seq, 1));
        }
        let order = drain(&mut s);
        let of = |x: &str| -> Vec<u64> {
            order
                .iter()
                .filter(|(s, _)| *s == x)
                .map(|(_, q)| *q)
                .collect()
        };
        assert_eq!(of("a"), vec![3, 4, 5]);
        assert_eq!(of("b"), vec![1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_delayed_retry_holds_its_subject_only() {
        let mut s = LaneState::new(SETTLE, false);
        queue(&mut s, live("a", 1, 1));
        queue(&mut s, live("a", 2, 1));
        queue(&mut s, live("b", 7, 1));
        let (first, _) = s.next_runnable();
        assert_eq!(first.as_ref().map(|m| m.seq), Some(1));
        s.finished(
            "a",
            1,
            true,
            Step::Retrying(Duration::from_secs(1)),
            ACK_WAIT,
        );
        // b flows; a's event 2 is held behind the retry.
        assert_eq!(drain(&mut s), vec![("b", 7)]);
        assert_eq!(s.queued().count(), 1);
        // The retried event comes back (delivery 2, awaited: no settling).
        queue(&mut s, live("a", 1, 2));
        assert_eq!(drain(&mut s), vec![("a", 1), ("a", 2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn redeliveries_settle_and_are_sorted() {
        let mut s = LaneState::new(SETTLE, false);
        // A crashed replica's messages come back in expiry order: 8 before 5.
        queue(&mut s, live("a", 8, 2));
        let (none, wake) = s.next_runnable();
        assert!(none.is_none());
        assert!(wake.is_some());
        tokio::time::advance(Duration::from_millis(200)).await;
        queue(&mut s, live("a", 5, 2));
        tokio::time::advance(Duration::from_millis(400)).await;
        // Still settling: the last redelivery arrived 400 ms ago.
        assert!(s.next_runnable().0.is_none());
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(drain(&mut s), vec![("a", 5), ("a", 8)]);
    }

    #[tokio::test(start_paused = true)]
    async fn duplicates_are_told_from_late_predecessors() {
        let mut s = LaneState::new(SETTLE, false);
        queue(&mut s, live("a", 1, 1));
        queue(&mut s, live("a", 3, 1));
        assert_eq!(drain(&mut s), vec![("a", 1), ("a", 3)]);
        // Handled before: a duplicate (ack again).
        assert!(matches!(s.enqueue(live("a", 1, 2)), Arrival::Duplicate(_)));
        // Never handled, but a later event was: late, never applied silently.
        assert!(matches!(s.enqueue(live("a", 2, 2)), Arrival::Late(_)));
        // A redriven dead letter of an earlier event is expected.
        let redriven = M {
            subject: "a",
            seq: 2,
            delivered: 1,
            live: false,
        };
        queue(&mut s, redriven);
        assert_eq!(drain(&mut s), vec![("a", 2)]);
    }

    /// Issue 12, finding 1: after a restart a lane knows nothing. Event 1
    /// was handled by the killed process, its ack lost; the new process
    /// handles event 3 first, then event 1 comes back (delivery 2). It is a
    /// redelivery to hand to the idempotent handler, not a reason to
    /// dead-letter and park the aggregate.
    #[tokio::test(start_paused = true)]
    async fn after_a_restart_a_redelivery_behind_newer_events_goes_to_the_handler() {
        let mut s = LaneState::new(SETTLE, true);
        queue(&mut s, live("a", 3, 1));
        assert_eq!(drain(&mut s), vec![("a", 3)]);
        match s.enqueue(live("a", 1, 2)) {
            Arrival::QueuedLate { subject, seq } => assert_eq!((subject.as_str(), seq), ("a", 1)),
            _ => panic!("a late redelivery must be queued for the handler"),
        }
        tokio::time::advance(SETTLE).await;
        assert_eq!(drain(&mut s), vec![("a", 1)]);
        // Handled now: a further redelivery is a plain duplicate.
        assert!(matches!(s.enqueue(live("a", 1, 3)), Arrival::Duplicate(_)));
        // Where late events must not run, they are still reported.
        let mut strict = LaneState::new(SETTLE, false);
        queue(&mut strict, live("a", 3, 1));
        assert_eq!(drain(&mut strict), vec![("a", 3)]);
        assert!(matches!(strict.enqueue(live("a", 1, 2)), Arrival::Late(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_hands_back_only_subjects_not_waiting() {
        let mut s = LaneState::new(SETTLE, false);
        queue(&mut s, live("a", 1, 1));
        queue(&mut s, live("a", 2, 1));
        queue(&mut s, live("b", 3, 1));
        queue(&mut s, live("b", 4, 1));
        let (first, _) = s.next_runnable();
        let first = first.map(|m| (m.subject, m.seq));
        assert!(matches!(first, Some(("a", 1) | ("b", 3))));
        let (subject, seq) = first.unwrap_or(("a", 1));
        s.finished(
            subject,
            seq,
            true,
            Step::Retrying(Duration::from_secs(1)),
            ACK_WAIT,
        );
        let back: Vec<u64> = s.handback().map(|m| m.seq).collect();
        // The waiting subject's held event stays; the other is handed back in order.
        if subject == "a" {
            assert_eq!(back, vec![3, 4]);
        } else {
            assert_eq!(back, vec![1, 2]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_that_never_returns_releases_its_held_events() {
        let mut s = LaneState::new(SETTLE, false);
        queue(&mut s, live("a", 1, 1));
        queue(&mut s, live("a", 2, 1));
        let _ = s.next_runnable();
        s.finished(
            "a",
            1,
            true,
            Step::Retrying(Duration::from_millis(100)),
            ACK_WAIT,
        );
        s.expire_waits("w");
        assert_eq!(s.queued().count(), 1, "held before the deadline");
        tokio::time::advance(Duration::from_millis(100) + ACK_WAIT * 2).await;
        s.expire_waits("w");
        assert_eq!(s.queued().count(), 0, "released to the server after it");
        assert!(s.next_runnable().0.is_none());
    }
}
