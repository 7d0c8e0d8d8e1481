//! `sluice bench`: side-by-side figures against freshly started servers.
//! Figures belong here, never in timed tests.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde_json::json;
use sluice_events::{
    EmbeddedConfig, EmbeddedServer, EventStore, ExpectedVersion, NewEvent, StoreConfig, StreamId,
    SyncInterval,
};

/// Benchmarks.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum BenchCommand {
    /// Append throughput: raw async-nats pipelined publish vs Sluice `append`.
    Append(AppendArgs),
    /// Worker runtime throughput vs a raw JetStream consumer.
    Workers(crate::bench_workers::WorkersArgs),
    /// Projection catch-up and rebuild vs raw batched upserts (SQLite, PostgreSQL).
    Projections(crate::bench_projections::ProjectionsArgs),
    /// Transfer sagas per second and request-to-completed latency.
    Sagas(crate::bench_sagas::SagasArgs),
}

/// Options of `sluice bench append`.
#[derive(Debug, clap::Args)]
pub(crate) struct AppendArgs {
    /// Events per measured phase.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Distinct aggregates the Sluice appends spread over.
    #[arg(long, default_value_t = 10_000)]
    aggregates: usize,
    /// Concurrent Sluice appenders (default 256; 64 with --durable).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Only `sync_interval: always`: naive per-message publish vs Sluice with
    /// 64 writers, with latency percentiles and idle latency.
    #[arg(long)]
    durable: bool,
    /// Which server sync policies to measure (without --durable).
    #[arg(long, value_enum, default_value_t = SyncChoice::Both)]
    sync: SyncChoice,
    /// Print one JSON summary object.
    #[arg(long)]
    json: bool,
}

/// `--sync`: the server's default fsync policy, `always`, or both rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SyncChoice {
    /// Only the server's default (fsync every 2 minutes).
    Default,
    /// Only `sync_interval: always`.
    Always,
    /// Both rows.
    Both,
}

const PAYLOAD: &[u8] =
    br#"{"amount":1250,"reference":"bench-0000000000","note":"a payload of typical size"}"#;
const EVENT_TYPE: &str = "bench.account.deposited.v1";
/// Publishes the raw rows keep in flight.
const RAW_WINDOW: usize = 4096;

struct Server {
    server: EmbeddedServer,
    _dir: tempfile_dir::TempDir,
}

mod tempfile_dir {
    //! A directory removed on drop, without another dependency.
    use std::path::{Path, PathBuf};

    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new(prefix: &str) -> std::io::Result<Self> {
            let p = std::env::temp_dir().join(format!(
                "{prefix}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            ));
            std::fs::create_dir_all(&p)?;
            Ok(Self(p))
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn start(sync: SyncInterval) -> anyhow::Result<Server> {
    let dir = tempfile_dir::TempDir::new("sluice-bench")?;
    let mut config = EmbeddedConfig::new(dir.path());
    config.sync = sync;
    let server = EmbeddedServer::start(config).context("starting nats-server for the bench")?;
    Ok(Server { server, _dir: dir })
}

/// Raw async-nats: pipelined publishes with the same headers and payload.
/// With `occ`, every publish also carries the optimistic-concurrency check
/// Sluice's appends carry (`Nats-Expected-Last-Subject-Sequence`), over the
/// same number of aggregates as the Sluice row, each expecting the sequence
/// its previous event got, so the server does the same work per event.
/// At most `window` acks are outstanding at once.
async fn raw_publish(
    url: &str,
    events: usize,
    occ: bool,
    window: usize,
    aggregates: usize,
) -> anyhow::Result<f64> {
    let client = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(client);
    let payload = Bytes::from_static(PAYLOAD);
    let aggregates = aggregates.max(1);
    // A fresh name per run, so every run starts from empty subjects.
    let run = uuid::Uuid::now_v7().simple().to_string();
    let mut last: Vec<u64> = vec![0; aggregates];
    let mut outstanding: Vec<bool> = vec![false; aggregates];
    let started = Instant::now();
    let mut inflight: FuturesUnordered<_> = FuturesUnordered::new();
    for i in 0..events {
        let a = i % aggregates;
        let event = NewEvent::new(EVENT_TYPE, payload.clone());
        let agg = format!("raw{}-{a}", &run[24..]);
        let mut headers = event.headers(&agg);
        if occ {
            // The expectation is the sequence the previous event of this
            // aggregate got: wait for its ack if it is still out.
            while outstanding[a] {
                match inflight.next().await {
                    Some((b, r)) => {
                        let ack: async_nats::jetstream::publish::PublishAck = r?;
                        last[b] = ack.sequence;
                        outstanding[b] = false;
                    }
                    None => break,
                }
            }
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                last[a].to_string().as_str(),
            );
        }
        let ack = js
            .publish_with_headers(format!("events.bench.{agg}"), headers, payload.clone())
            .await?;
        outstanding[a] = true;
        inflight.push(async move { (a, ack.await) });
        while inflight.len() >= window {
            if let Some((b, r)) = inflight.next().await {
                last[b] = r?.sequence;
                outstanding[b] = false;
            }
        }
    }
    while let Some((_, r)) = inflight.next().await {
        r?;
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

struct SluiceRun {
    eps: f64,
    p50: Duration,
    p99: Duration,
}

/// Sluice `append` of single events with exact expectations, `concurrency`
/// writers each owning a share of the aggregates.
async fn sluice_append(
    store: &EventStore,
    events: usize,
    aggregates: usize,
    concurrency: usize,
) -> anyhow::Result<SluiceRun> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let store = store.clone();
        let per_writer = events / concurrency + usize::from(w < events % concurrency);
        let owned: Vec<usize> = (0..aggregates).filter(|a| a % concurrency == w).collect();
        tasks.push(tokio::spawn(async move {
            let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
            let mut versions: HashMap<usize, u64> = HashMap::new();
            for i in 0..per_writer {
                let agg = owned[i % owned.len().max(1)];
                // Each run gets its own aggregates, so runs on one server
                // start from empty streams.
                let id = StreamId::new("bench", format!("c{concurrency}-{agg}"))?;
                let v = versions.get(&agg).copied().unwrap_or(0);
                let t = Instant::now();
                let r = store
                    .append(
                        &id,
                        ExpectedVersion::from_version(v),
                        vec![NewEvent::new(EVENT_TYPE, PAYLOAD)],
                    )
                    .await?;
                hist.record(t.elapsed().as_micros() as u64)?;
                versions.insert(agg, r.version);
            }
            anyhow::Ok(hist)
        }));
    }
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    for t in tasks {
        hist.add(t.await??)?;
    }
    Ok(SluiceRun {
        eps: events as f64 / started.elapsed().as_secs_f64(),
        p50: Duration::from_micros(hist.value_at_quantile(0.5)),
        p99: Duration::from_micros(hist.value_at_quantile(0.99)),
    })
}

/// p50 of single appends with nothing else going on.
async fn idle_p50(store: &EventStore, n: usize) -> anyhow::Result<Duration> {
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let id = StreamId::new("bench", "idle")?;
    let mut v = store.last_version(&id).await?;
    for _ in 0..n {
        let t = Instant::now();
        v = store
            .append(
                &id,
                ExpectedVersion::from_version(v),
                vec![NewEvent::new(EVENT_TYPE, PAYLOAD)],
            )
            .await?
            .version;
        hist.record(t.elapsed().as_micros() as u64)?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(Duration::from_micros(hist.value_at_quantile(0.5)))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let args = match cmd {
        BenchCommand::Append(args) => args,
        BenchCommand::Workers(args) => return crate::bench_workers::run(args).await,
        BenchCommand::Projections(args) => return crate::bench_projections::run(args).await,
        BenchCommand::Sagas(args) => return crate::bench_sagas::run(args).await,
    };
    if args.events == 0 || args.aggregates == 0 {
        anyhow::bail!("--events and --aggregates must be at least 1");
    }
    if args.durable {
        return durable(args).await;
    }
    let concurrency = args.concurrency.unwrap_or(256).max(1);
    let mut runs = Vec::new();
    for (name, sync) in [
        ("default", SyncInterval::ServerDefault),
        ("always", SyncInterval::Always),
    ] {
        let wanted = match args.sync {
            SyncChoice::Both => true,
            SyncChoice::Default => sync == SyncInterval::ServerDefault,
            SyncChoice::Always => sync == SyncInterval::Always,
        };
        if !wanted {
            continue;
        }
        let server = start(sync)?;
        let url = server.server.url();
        // Group commit pays off only when every write is fsynced; without
        // that, one write per append is faster (see docs/group-commit.md).
        let mut config = StoreConfig::default();
        config.group_commit.enabled = sync == SyncInterval::Always;
        let store = EventStore::connect(&url, config).await?;
        // Unmeasured: the first writes to a fresh server pay for creating
        // its first block files, which would otherwise count against
        // whichever row runs first.
        raw_publish(
            &url,
            args.events.min(10_000),
            false,
            RAW_WINDOW,
            args.aggregates,
        )
        .await?;
        let raw = raw_publish(&url, args.events, false, RAW_WINDOW, args.aggregates).await?;
        let raw_occ = raw_publish(&url, args.events, true, RAW_WINDOW, args.aggregates).await?;
        // The same number of publishes in flight as Sluice has appenders: the
        // server reads and acks in chunks, so a deeper pipeline alone is
        // worth throughput that has nothing to do with Sluice.
        let raw_same = raw_publish(&url, args.events, false, concurrency, args.aggregates).await?;
        let s = sluice_append(&store, args.events, args.aggregates, concurrency).await?;
        runs.push(json!({
            "sync_interval": name,
            "group_commit": store.group_commit_stats().enabled,
            "raw_publish_per_s": raw.round() as u64,
            "raw_occ_publish_per_s": raw_occ.round() as u64,
            "sluice_append_per_s": s.eps.round() as u64,
            "ratio": (s.eps / raw * 100.0).round() / 100.0,
            "ratio_vs_raw_occ": (s.eps / raw_occ * 100.0).round() / 100.0,
            "raw_same_window_publish_per_s": raw_same.round() as u64,
            "ratio_same_window": (s.eps / raw_same * 100.0).round() / 100.0,
            "append_p50_ms": ms(s.p50),
            "append_p99_ms": ms(s.p99),
        }));
    }
    let summary = json!({
        "bench": "append",
        "events": args.events,
        "aggregates": args.aggregates,
        "concurrency": concurrency,
        "target_ratio": 0.9,
        "runs": runs,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "append: {} events per phase, {} aggregates, {} concurrent appenders, one fresh nats-server per row",
            args.events, args.aggregates, concurrency
        );
        println!(
            "{:<14} {:>6} {:>14} {:>18} {:>16} {:>7} {:>8} {:>8} {:>8}",
            "sync_interval",
            "group",
            "raw publish/s",
            "raw+OCC publish/s",
            "sluice append/s",
            "ratio",
            "vs OCC",
            "p50 ms",
            "p99 ms"
        );
        for r in &runs {
            println!(
                "{:<14} {:>6} {:>14} {:>18} {:>16} {:>7} {:>8} {:>8.2} {:>8.2}",
                r["sync_interval"].as_str().unwrap_or(""),
                if r["group_commit"] == true {
                    "on"
                } else {
                    "off"
                },
                r["raw_publish_per_s"],
                r["raw_occ_publish_per_s"],
                r["sluice_append_per_s"],
                r["ratio"],
                r["ratio_vs_raw_occ"],
                r["append_p50_ms"].as_f64().unwrap_or(0.0),
                r["append_p99_ms"].as_f64().unwrap_or(0.0),
            );
        }
        println!("target: sluice/raw >= 0.9");
    }
    Ok(())
}

async fn durable(args: AppendArgs) -> anyhow::Result<()> {
    let writer_counts = match args.concurrency {
        Some(n) => vec![n.max(1)],
        None => vec![64, 256],
    };
    let server = start(SyncInterval::Always)?;
    let url = server.server.url();
    let idle = {
        let store = EventStore::connect(&url, StoreConfig::default()).await?;
        idle_p50(&store, 200).await?
    };
    let naive = raw_publish(&url, args.events, false, RAW_WINDOW, args.aggregates).await?;
    let mut runs = Vec::new();
    for writers in writer_counts {
        // A fresh connection per row, so the group-commit figures are its own.
        let store = EventStore::connect(&url, StoreConfig::default()).await?;
        let s = sluice_append(&store, args.events, args.aggregates, writers).await?;
        let stats = store.group_commit_stats();
        runs.push(json!({
            "writers": writers,
            "sluice_append_per_s": s.eps.round() as u64,
            "ratio": (s.eps / naive * 100.0).round() / 100.0,
            "append_p50_ms": ms(s.p50),
            "append_p99_ms": ms(s.p99),
            "group_commit": serde_json::to_value(&stats)?,
        }));
    }
    let summary = json!({
        "bench": "append --durable",
        "sync_interval": "always",
        "events": args.events,
        "aggregates": args.aggregates,
        "naive_publish_per_s": naive.round() as u64,
        "idle_append_p50_ms": ms(idle),
        "target_ratio": 10.0,
        "runs": runs,
    });
    if args.json {
        println!("{summary}");
        return Ok(());
    }
    println!(
        "append --durable: sync_interval always, {} events per row, {} aggregates",
        args.events, args.aggregates
    );
    println!("  naive pipelined publish (one fsync each): {naive:>9.0} events/s");
    println!(
        "  idle single append p50:                   {:>9.2} ms",
        ms(idle)
    );
    for r in &runs {
        let gc = &r["group_commit"];
        println!(
            "  sluice, {:>4} writers: {:>9} events/s  {:>5}x naive  p50 {:.2} ms  p99 {:.2} ms",
            r["writers"],
            r["sluice_append_per_s"],
            r["ratio"],
            r["append_p50_ms"].as_f64().unwrap_or(0.0),
            r["append_p99_ms"].as_f64().unwrap_or(0.0),
        );
        println!(
            "      batches {}  mean {:.1} / max {} events per batch  fsyncs saved {}  conflicts resolved {}  linger {} us",
            gc["batches"],
            gc["mean_batch_events"].as_f64().unwrap_or(0.0),
            gc["max_batch_events"],
            gc["fsyncs_saved"],
            gc["conflicts_resolved"],
            gc["linger_us"],
        );
        let buckets: Vec<String> = gc["batch_sizes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["batches"].as_u64().unwrap_or(0) > 0)
            .map(|b| format!("{}-{}: {}", b["min_events"], b["max_events"], b["batches"]))
            .collect();
        println!(
            "      batch sizes (events: batches)  {}",
            buckets.join("  ")
        );
    }
    println!("  target: >= 10x naive");
    Ok(())
}
