//! `sluice-bench workers`: handler throughput of the Sluice worker runtime
//! with a no-op handler vs a raw async-nats pull consumer with explicit acks,
//! on the same stream in one run, at concurrency 1 and 8.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde_json::json;
use sluice_events::{
    EmbeddedConfig, EmbeddedServer, EventStore, ExpectedVersion, NewEvent, StoreConfig, StreamId,
    SyncInterval,
};
use sluice_workers::{Delivery, HandlerError, WorkerConfig};
use tokio_util::sync::CancellationToken;

/// Durable names of the bench's consumers (constants: a renamed durable
/// consumer re-reads the whole stream).
const RAW_C1: &str = "bench-raw-c1";
const RAW_C8: &str = "bench-raw-c8";
const WORKER_C1: &str = "bench-worker-c1";
const WORKER_C8: &str = "bench-worker-c8";

const PAYLOAD: &[u8] =
    br#"{"amount":1250,"reference":"bench-0000000000","note":"a payload of typical size"}"#;

/// Options of `sluice-bench workers`.
#[derive(Debug, clap::Args)]
pub struct WorkersArgs {
    /// Events in the stream (each phase consumes all of them).
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Distinct aggregates the events spread over.
    #[arg(long, default_value_t = 1_000)]
    aggregates: usize,
    /// Print one JSON summary object.
    #[arg(long)]
    json: bool,
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
    let started = Instant::now();
    let messages = c.stream().max_messages_per_batch(200).messages().await?;
    let done = Arc::new(AtomicU64::new(0));
    messages
        .take(events)
        .for_each_concurrent(concurrency, |m| {
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
    Ok(events as f64 / started.elapsed().as_secs_f64())
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
    let first = Arc::new(std::sync::OnceLock::<Instant>::new());
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
    Ok(events as f64 / elapsed.as_secs_f64())
}

/// Runs `sluice-bench workers`.
pub(crate) async fn run(args: WorkersArgs) -> anyhow::Result<()> {
    let dir = TempDir(std::env::temp_dir().join(format!("sluice-bench-workers-{}", uuid_like())));
    std::fs::create_dir_all(&dir.0)?;
    let mut config = EmbeddedConfig::new(&dir.0);
    config.sync = SyncInterval::Always;
    let server = EmbeddedServer::start(config).context("starting nats-server for the bench")?;
    let store = EventStore::connect(&server.url(), StoreConfig::default()).await?;
    seed(&store, args.events, args.aggregates).await?;

    let raw1 = raw(&store, RAW_C1, args.events, 1).await?;
    let sluice1 = worker(&store, WORKER_C1, args.events, 1).await?;
    let raw8 = raw(&store, RAW_C8, args.events, 8).await?;
    let sluice8 = worker(&store, WORKER_C8, args.events, 8).await?;
    drop(server);

    if args.json {
        println!(
            "{}",
            json!({
                "bench": "workers",
                "events": args.events,
                "aggregates": args.aggregates,
                "concurrency_1": { "raw_per_s": raw1, "sluice_per_s": sluice1, "ratio": sluice1 / raw1 },
                "concurrency_8": { "raw_per_s": raw8, "sluice_per_s": sluice8, "ratio": sluice8 / raw8 },
                "target_ratio": 0.8,
            })
        );
    } else {
        println!(
            "workers: {} events over {} aggregates, no-op handler vs raw pull consumer with explicit acks",
            args.events, args.aggregates
        );
        for (c, r, s) in [(1, raw1, sluice1), (8, raw8, sluice8)] {
            println!(
                "  concurrency {c}: raw {r:>10.0} ev/s   sluice {s:>10.0} ev/s   ratio {:.2} (target >= 0.80)",
                s / r
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
