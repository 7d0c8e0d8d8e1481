//! `sluice-bench workers`: handler throughput of the Sluice worker runtime
//! with a no-op handler vs a raw async-nats pull consumer with explicit acks,
//! on the same stream in one run, at concurrency 1 and 8. The two alternate
//! over `--reps` rounds (which goes first swaps every round); the medians,
//! the range of the per-round ratios and every round are reported.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;
use sluice_events::{
    EmbeddedConfig, EmbeddedServer, EventStore, ExpectedVersion, NewEvent, StoreConfig, StreamId,
    SyncInterval,
};
use sluice_workers::{Delivery, HandlerError, WorkerConfig};
use tokio_util::sync::CancellationToken;

use crate::stats;

/// Prefixes of the bench's durable consumer names. Every phase gets a name
/// of its own (`<prefix>-c<concurrency>-r<round>`): a new durable consumer
/// reads the whole stream from the start, so every round consumes all of it.
const RAW_PREFIX: &str = "bench-raw";
const WORKER_PREFIX: &str = "bench-worker";

/// The concurrencies of the rows.
const CONCURRENCIES: [usize; 2] = [1, 8];

const PAYLOAD: &[u8] =
    br#"{"amount":1250,"reference":"bench-0000000000","note":"a payload of typical size"}"#;

/// Options of `sluice-bench workers`.
#[derive(Debug, clap::Args)]
pub struct WorkersArgs {
    /// Events in the stream (every phase of every round consumes all of
    /// them).
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Distinct aggregates the events spread over.
    #[arg(long, default_value_t = 1_000)]
    aggregates: usize,
    /// Rounds of raw and Sluice, interleaved; medians are reported, since a
    /// shared 2-core machine swings between runs.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print one JSON summary object.
    #[arg(long)]
    json: bool,
}

/// One round of one row: both rates, events per second.
#[derive(Debug, Clone, Copy, Serialize)]
struct Round {
    raw_per_s: f64,
    sluice_per_s: f64,
    ratio: f64,
}

/// The figures of one concurrency over all rounds.
#[derive(Debug, Clone, Serialize)]
struct Row {
    /// Median of the raw rounds, events per second.
    raw_per_s: f64,
    /// Median of the Sluice rounds, events per second.
    sluice_per_s: f64,
    /// Sluice / raw of the medians; the target is >= 0.8.
    ratio: f64,
    /// The lowest Sluice / raw of one round.
    ratio_min: f64,
    /// The highest Sluice / raw of one round.
    ratio_max: f64,
    /// Every round, in order.
    rounds: Vec<Round>,
}

impl Row {
    fn of(rounds: Vec<Round>) -> Self {
        let raw = stats::median(&rounds.iter().map(|r| r.raw_per_s).collect::<Vec<_>>());
        let sluice = stats::median(&rounds.iter().map(|r| r.sluice_per_s).collect::<Vec<_>>());
        let (ratio_min, ratio_max) =
            stats::range(&rounds.iter().map(|r| r.ratio).collect::<Vec<_>>());
        Self {
            raw_per_s: raw,
            sluice_per_s: sluice,
            ratio: sluice / raw.max(1e-9),
            ratio_min,
            ratio_max,
            rounds,
        }
    }
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn seed(store: &EventStore, events: usize, aggregates: usize) -> anyhow::Result<()> {
    let aggregates = aggregates.max(1);
    let per = events.div_ceil(aggregates);
    let mut left = events;
    let mut appends = futures::stream::FuturesUnordered::new();
    for a in 0..aggregates {
        let n = per.min(left);
        if n == 0 {
            break;
        }
        left -= n;
        let store = store.clone();
        appends.push(async move {
            let sid = StreamId::new("bench", format!("agg-{a}"))?;
            for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
                let batch = chunk
                    .iter()
                    .map(|_| NewEvent::new("bench.account.deposited.v1", PAYLOAD))
                    .collect();
                store.append(&sid, ExpectedVersion::Any, batch).await?;
            }
            anyhow::Ok(())
        });
        if appends.len() >= 64
            && let Some(r) = appends.next().await
        {
            r?;
        }
    }
    while let Some(r) = appends.next().await {
        r?;
    }
    Ok(())
}

/// A raw durable pull consumer acking every message, `concurrency` acks in flight.
async fn raw(
    store: &EventStore,
    name: &str,
    events: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    use async_nats::jetstream::consumer;
    let stream = store.stream_named("EVENTS").await?;
    let c: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 1000,
            ..Default::default()
        })
        .await?;
    // The clock starts at the first message, as the worker's does.
    let first = OnceLock::<Instant>::new();
    let messages = c.stream().max_messages_per_batch(200).messages().await?;
    let done = Arc::new(AtomicU64::new(0));
    messages
        .take(events)
        .for_each_concurrent(concurrency, |m| {
            first.get_or_init(Instant::now);
            let done = done.clone();
            async move {
                if let Ok(m) = m
                    && m.ack().await.is_ok()
                {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .await;
    anyhow::ensure!(
        done.load(Ordering::Relaxed) as usize == events,
        "raw consumer acked {} of {events}",
        done.load(Ordering::Relaxed)
    );
    let elapsed = first.get().map(Instant::elapsed).unwrap_or_default();
    Ok(events as f64 / elapsed.as_secs_f64().max(1e-9))
}

/// The Sluice worker runtime with a no-op handler.
async fn worker(
    store: &EventStore,
    name: &'static str,
    events: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let mut config = WorkerConfig::new(name);
    config.concurrency = concurrency;
    config.capture_advisories = false;
    let handled = Arc::new(AtomicU64::new(0));
    let counter = handled.clone();
    // The clock starts at the first handled event: the runtime's start-up
    // (ensuring streams, consumers and the parked-set cache) is not throughput.
    let first = Arc::new(OnceLock::<Instant>::new());
    let first_seen = first.clone();
    let cancel = CancellationToken::new();
    let task = {
        let store = store.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            sluice_workers::run(
                &store,
                config,
                move |_d: Delivery| {
                    let counter = counter.clone();
                    first_seen.get_or_init(Instant::now);
                    async move {
                        counter.fetch_add(1, Ordering::Relaxed);
                        Ok::<(), HandlerError>(())
                    }
                },
                cancel,
            )
            .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while (handled.load(Ordering::Relaxed) as usize) < events {
        anyhow::ensure!(Instant::now() < deadline, "worker bench did not finish");
        if task.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = first.get().map(Instant::elapsed).unwrap_or_default();
    cancel.cancel();
    task.await??;
    anyhow::ensure!(
        handled.load(Ordering::Relaxed) as usize >= events,
        "worker handled {} of {events}",
        handled.load(Ordering::Relaxed)
    );
    Ok(events as f64 / elapsed.as_secs_f64().max(1e-9))
}

/// Runs `sluice-bench workers`.
pub(crate) async fn run(args: WorkersArgs) -> anyhow::Result<()> {
    let dir = TempDir(std::env::temp_dir().join(format!("sluice-bench-workers-{}", uuid_like())));
    std::fs::create_dir_all(&dir.0)?;
    let mut config = EmbeddedConfig::new(&dir.0);
    config.sync = SyncInterval::Always;
    let server = EmbeddedServer::start(config).context("starting nats-server for the bench")?;
    let store = EventStore::connect(&server.url(), StoreConfig::default()).await?;
    if !args.json {
        eprintln!("appending {} events...", args.events);
    }
    seed(&store, args.events, args.aggregates).await?;

    let reps = args.reps.max(1);
    let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); CONCURRENCIES.len()];
    for round in 0..reps {
        for (row, &c) in CONCURRENCIES.iter().enumerate() {
            // Raw and Sluice alternate, and which goes first swaps every
            // round, so a swing of the machine hits both alike.
            let raw_name = format!("{RAW_PREFIX}-c{c}-r{round}");
            // `WorkerConfig::name` is `&'static str`: one short name per
            // phase, for the life of this process.
            let worker_name: &'static str =
                Box::leak(format!("{WORKER_PREFIX}-c{c}-r{round}").into_boxed_str());
            let (r, s) = if round % 2 == 0 {
                let r = raw(&store, &raw_name, args.events, c).await?;
                (r, worker(&store, worker_name, args.events, c).await?)
            } else {
                let s = worker(&store, worker_name, args.events, c).await?;
                (raw(&store, &raw_name, args.events, c).await?, s)
            };
            if !args.json {
                eprintln!(
                    "round {}/{reps}, concurrency {c}: raw {r:.0} ev/s, sluice {s:.0} ev/s",
                    round + 1
                );
            }
            rounds[row].push(Round {
                raw_per_s: r,
                sluice_per_s: s,
                ratio: s / r.max(1e-9),
            });
        }
    }
    drop(server);
    let rows: Vec<(usize, Row)> = CONCURRENCIES
        .iter()
        .copied()
        .zip(rounds.into_iter().map(Row::of))
        .collect();

    if args.json {
        let mut out = json!({
            "bench": "workers",
            "events": args.events,
            "aggregates": args.aggregates,
            "reps": reps,
            "target_ratio": 0.8,
        });
        for (c, row) in &rows {
            out[format!("concurrency_{c}")] = serde_json::to_value(row)?;
        }
        println!("{out}");
    } else {
        println!(
            "workers: {} events over {} aggregates, no-op handler vs raw pull consumer with explicit acks; medians of {reps} interleaved rounds",
            args.events, args.aggregates
        );
        for (c, row) in &rows {
            println!(
                "  concurrency {c}: raw {:>10.0} ev/s   sluice {:>10.0} ev/s   ratio {:.2} ({:.2}-{:.2}) (target >= 0.80)",
                row.raw_per_s, row.sluice_per_s, row.ratio, row.ratio_min, row.ratio_max
            );
        }
        for (c, row) in &rows {
            let rounds: Vec<String> = row
                .rounds
                .iter()
                .map(|r| format!("{:.0}/{:.0}", r.raw_per_s, r.sluice_per_s))
                .collect();
            println!(
                "  concurrency {c} rounds (raw/sluice): {}",
                rounds.join("  ")
            );
        }
    }
    Ok(())
}

/// A unique enough suffix for the temp directory, without another dependency.
fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}
