//! Workers stopped on an aggregate because its dead letter cannot be
//! stored: what `/readyz` and the `sluice_worker_halted` gauge report.
//!
//! Process-wide, like the metrics recorder: every worker running in this
//! process records here, and the HTTP API of the same process reads it
//! without being handed a handle.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use serde::Serialize;
use time::OffsetDateTime;

/// One aggregate a worker holds because its dead letter could not be stored.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerHalt {
    /// The worker.
    pub worker: String,
    /// Subject of the held message (its aggregate).
    pub subject: String,
    /// Its stream sequence.
    pub sequence: u64,
    /// What failed and what to do.
    pub reason: String,
    /// Since when.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

type Halts = BTreeMap<(String, String), WorkerHalt>;

fn halts_map() -> MutexGuard<'static, Halts> {
    static HALTS: OnceLock<Mutex<Halts>> = OnceLock::new();
    let m = HALTS.get_or_init(|| Mutex::new(BTreeMap::new()));
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// How many halts are recorded: lets the hot path skip the lock.
static COUNT: AtomicUsize = AtomicUsize::new(0);

fn gauge(worker: &str, halts: &Halts) {
    let any = halts.keys().any(|(w, _)| w == worker);
    metrics::gauge!("sluice_worker_halted", "worker" => worker.to_owned()).set(if any {
        1.0
    } else {
        0.0
    });
}

/// Every aggregate a worker of this process holds because it cannot
/// dead-letter, oldest first per worker.
pub fn worker_halts() -> Vec<WorkerHalt> {
    halts_map().values().cloned().collect()
}

/// Records that `worker` holds `subject` because its dead letter failed.
pub(crate) fn halted(worker: &str, subject: &str, sequence: u64, reason: String) {
    let mut halts = halts_map();
    let key = (worker.to_owned(), subject.to_owned());
    let since = halts
        .get(&key)
        .map_or_else(OffsetDateTime::now_utc, |h| h.since);
    let fresh = halts
        .insert(
            key,
            WorkerHalt {
                worker: worker.to_owned(),
                subject: subject.to_owned(),
                sequence,
                reason,
                since,
            },
        )
        .is_none();
    if fresh {
        COUNT.fetch_add(1, Ordering::Relaxed);
    }
    gauge(worker, &halts);
}

/// `subject` made progress for `worker`: it is no longer held.
pub(crate) fn progressed(worker: &str, subject: &str) {
    if COUNT.load(Ordering::Relaxed) == 0 {
        return;
    }
    let mut halts = halts_map();
    if halts
        .remove(&(worker.to_owned(), subject.to_owned()))
        .is_some()
    {
        COUNT.fetch_sub(1, Ordering::Relaxed);
        tracing::info!(
            worker,
            subject,
            "dead letters are stored again; the aggregate moves on"
        );
        gauge(worker, &halts);
    }
}
