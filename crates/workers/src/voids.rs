//! Voided events and dead letters: once an event is voided, this worker's
//! dead letter of it is handed back, so the worker skips it and releases
//! the aggregate parked behind it (the later events follow, in order).

use std::collections::HashSet;
use std::time::Duration;

use sluice_events::{EVENTS_STREAM, Voided};
use tokio_util::sync::CancellationToken;

use sluice_events::EventStore;

use crate::dlq::{self, Filter, RedriveTarget};
use crate::error::Error;

/// How long to wait before trying again after the DLQ could not be read.
const RETRY: Duration = Duration::from_secs(5);

/// Follows the voided set until `cancel`: for every voided position (those
/// known at start, then each new one), redrives `consumer`'s dead letter of
/// it when it heads its aggregate.
pub(crate) async fn release_voided(
    store: EventStore,
    consumer: &'static str,
    voided: Voided,
    cancel: CancellationToken,
) {
    let mut changes = voided.subscribe();
    let mut seen = 0;
    loop {
        let new = voided.since(seen);
        if !new.is_empty() {
            match redrive_voided(&store, consumer, &new).await {
                Ok(n) => {
                    seen += new.len();
                    if n > 0 {
                        tracing::info!(
                            worker = consumer,
                            redriven = n,
                            "dead letters of voided events handed back"
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(worker = consumer, error = %e, "could not hand back dead letters of voided events; retrying");
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(RETRY), if seen < voided.len() => {}
        }
    }
}

/// Redrives `consumer`'s dead letters of `positions` that head their
/// aggregate (one parked behind another head comes back with that head).
async fn redrive_voided(
    store: &EventStore,
    consumer: &str,
    positions: &[u64],
) -> Result<usize, Error> {
    let wanted: HashSet<u64> = positions.iter().copied().collect();
    let filter = Filter {
        consumer: Some(consumer.to_owned()),
        category: None,
        reason: None,
    };
    let listing = match dlq::list(store, &filter).await {
        Ok(l) => l,
        // No DLQ yet: nothing was ever dead-lettered.
        Err(Error::NotFound(_)) => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut redriven = 0;
    for entry in listing.entries {
        if entry.stream != EVENTS_STREAM || !wanted.contains(&entry.sequence) {
            continue;
        }
        match dlq::redrive(store, RedriveTarget::Id(entry.id)).await {
            Ok(r) => redriven += r.redriven.len(),
            Err(Error::NotHead { .. } | Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(redriven)
}
