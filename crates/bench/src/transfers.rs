//! `sluice-bench sagas`: completed transfer sagas per second and the time
//! from request to `completed`, against a running saga role.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use sluice_events::{EventStore, execute};
use sluice_ledger::{Account, AccountCommand, TRANSFER_SAGA, start_transfer};
use sluice_sagas::SagaEvent;
use tokio::sync::Semaphore;

use crate::Error;

/// What to run.
#[derive(Debug, Clone)]
pub struct SagaBenchConfig {
    /// Transfers to run.
    pub transfers: usize,
    /// Accounts they move money among.
    pub accounts: usize,
    /// Transfers in flight at once (requests not yet completed).
    pub in_flight: usize,
    /// Prefix of account and transfer ids (unique per run).
    pub prefix: String,
}

/// What it measured.
#[derive(Debug, Clone, Serialize)]
pub struct SagaBenchReport {
    /// Transfers completed.
    pub completed: usize,
    /// Wall time from the first request to the last completion (ms).
    pub elapsed_ms: u128,
    /// Completed sagas per second.
    pub sagas_per_sec: f64,
    /// Median request → completed (ms).
    pub p50_ms: f64,
    /// 99th percentile request → completed (ms).
    pub p99_ms: f64,
}

/// Runs `config.transfers` transfers (a role must be running) and measures
/// them. Each completed transfer appends 5 saga events, 2 commands and 2
/// account events.
pub async fn bench_transfers(
    store: &EventStore,
    config: &SagaBenchConfig,
) -> Result<SagaBenchReport, Error> {
    let accounts: Vec<String> = (0..config.accounts.max(2))
        .map(|i| format!("{}-acc-{i}", config.prefix))
        .collect();
    for a in &accounts {
        let open = AccountCommand::Open {
            owner: "bench".into(),
            currency: "EUR".into(),
        };
        let deposit = AccountCommand::Deposit {
            amount: 1_000_000_000,
            currency: None,
        };
        for cmd in [open, deposit] {
            execute::<Account>(store, a, &cmd, 5)
                .await
                .map_err(Error::Setup)?;
        }
    }
    // Completions arrive on the saga streams; one live feed sees them all.
    let mut feed = store
        .subscribe(
            &format!("{}.saga-{TRANSFER_SAGA}.>", store.config().subject_prefix),
            None,
        )
        .await?;
    let permits = std::sync::Arc::new(Semaphore::new(config.in_flight.max(1)));
    let mut started: HashMap<String, Instant> = HashMap::new();
    let mut latencies = Vec::with_capacity(config.transfers);
    let begin = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let producer = {
        let store = store.clone();
        let permits = permits.clone();
        let accounts = accounts.clone();
        let prefix = config.prefix.clone();
        let n = config.transfers;
        tokio::spawn(async move {
            for i in 0..n {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                permit.forget();
                let from = accounts[i % accounts.len()].clone();
                let to = accounts[(i + 1) % accounts.len()].clone();
                let id = format!("{prefix}-t-{i}");
                let store = store.clone();
                // Each request on its own task, as concurrent clients would
                // send them: a serial loop would measure the start's round
                // trip, not the sagas.
                // The start time is queued before the request goes out, and
                // the loop below drains the queue before it reads the feed,
                // so a completion always finds its start.
                let _ = tx.send((id.clone(), Instant::now()));
                tokio::spawn(async move {
                    if let Err(e) = start_transfer(&store, Some(&id), &from, &to, 1).await {
                        tracing::warn!(transfer = %id, error = %e, "bench transfer not started");
                    }
                });
            }
        })
    };
    let mut last = begin;
    while latencies.len() < config.transfers {
        tokio::select! {
            biased;
            Some((id, at)) = rx.recv() => { started.insert(id, at); }
            Some(ev) = feed.next() => {
                let ev = ev?;
                let done = ev.envelope.event_type == sluice_sagas::STEP_SUCCEEDED
                    && matches!(
                        serde_json::from_slice::<SagaEvent>(&ev.envelope.data),
                        Ok(SagaEvent::StepSucceeded { step: 1, .. })
                    );
                if done {
                    let at = started.remove(ev.stream_id.id()).unwrap_or(begin);
                    last = Instant::now();
                    latencies.push(last - at);
                    permits.add_permits(1);
                }
            }
            () = tokio::time::sleep(Duration::from_secs(30)) => {
                return Err(Error::Stalled {
                    completed: latencies.len(),
                    total: config.transfers,
                });
            }
        }
    }
    producer.abort();
    latencies.sort();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1e3
    };
    let elapsed = last - begin;
    Ok(SagaBenchReport {
        completed: latencies.len(),
        elapsed_ms: elapsed.as_millis(),
        sagas_per_sec: latencies.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    })
}
