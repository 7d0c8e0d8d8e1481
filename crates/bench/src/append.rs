//! `sluice-bench append`: raw async-nats pipelined publish vs Sluice
//! `append`, against freshly started servers.

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

/// Options of `sluice-bench append`.
#[derive(Debug, clap::Args)]
pub struct AppendArgs {
    /// Events per measured phase with the server's default fsync.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Events per measured phase with `sync_interval: always` (also
    /// --durable), where the raw row fsyncs every message.
    #[arg(long, default_value_t = 20_000)]
    events_always: usize,
    /// Rounds of every row, interleaved; the medians are reported, since a
    /// shared 2-core machine swings between runs.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Distinct aggregates the Sluice appends spread over.
    #[arg(long, default_value_t = 10_000)]
    aggregates: usize,
    /// Concurrent Sluice appenders (default 4,096, as many as the raw
    /// pipeline keeps in flight; 64 and 256 with --durable).
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
pub enum SyncChoice {
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
    // Through ConnectConfig: a raw `async_nats::connect` ignores the
    // credential in the embedded server's URL. Same client options as the
    // Sluice row, so the comparison stays fair.
    let client = sluice_events::ConnectConfig::new(url).connect().await?;
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

/// Sluice `append` of single events, `concurrency` writers each owning a
/// share of the aggregates; with `occ` every append expects the version its
/// previous one returned (`Exact`), else `Any` (the headers raw sends).
async fn sluice_append(
    store: &EventStore,
    events: usize,
    aggregates: usize,
    concurrency: usize,
    occ: bool,
) -> anyhow::Result<SluiceRun> {
    // Each run gets its own aggregates, so runs on one server start from
    // empty streams; ids are made before the clock starts.
    let run = uuid::Uuid::now_v7().simple().to_string();
    let mut owned: Vec<Vec<StreamId>> = vec![Vec::new(); concurrency];
    for a in 0..aggregates {
        owned[a % concurrency].push(StreamId::new("bench", format!("{}-{a}", &run[24..]))?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (w, ids) in owned.into_iter().enumerate() {
        let store = store.clone();
        let per_writer = events / concurrency + usize::from(w < events % concurrency);
        tasks.push(tokio::spawn(async move {
            // Latencies go into a plain vector: a histogram per appender
            // would cost page faults inside the timed window.
            let mut latencies: Vec<u64> = Vec::with_capacity(per_writer);
            let mut versions = vec![0u64; ids.len()];
            for i in 0..per_writer {
                let Some(slot) = i.checked_rem(ids.len()) else {
                    break;
                };
                let t = Instant::now();
                let r = store
                    .append(
                        &ids[slot],
                        if occ {
                            ExpectedVersion::from_version(versions[slot])
                        } else {
                            ExpectedVersion::Any
                        },
                        vec![NewEvent::new(EVENT_TYPE, PAYLOAD)],
                    )
                    .await?;
                latencies.push(t.elapsed().as_micros() as u64);
                versions[slot] = r.version;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(events);
    for t in tasks {
        latencies.extend(t.await??);
    }
    let eps = events as f64 / started.elapsed().as_secs_f64();
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    for l in latencies {
        hist.record(l)?;
    }
    Ok(SluiceRun {
        eps,
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

pub(crate) async fn run(args: AppendArgs) -> anyhow::Result<()> {
    if args.events == 0 || args.aggregates == 0 {
        anyhow::bail!("--events and --aggregates must be at least 1");
    }
    if args.durable {
        return durable(args).await;
    }
    let concurrency = args.concurrency.unwrap_or(RAW_WINDOW).max(1);
    let reps = args.reps.max(1);
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
        let events = match sync {
            SyncInterval::Always => args.events_always.max(1),
            SyncInterval::ServerDefault => args.events,
        };
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
        raw_publish(&url, events.min(10_000), false, RAW_WINDOW, args.aggregates).await?;
        let (n, a) = (events, args.aggregates);
        let mut raw = Vec::new();
        let mut raw_occ = Vec::new();
        let mut raw_same = Vec::new();
        let mut sluice = Vec::new();
        let mut sluice_any = Vec::new();
        let mut latency = Vec::new();
        for _ in 0..reps {
            raw.push(cpu_measured(n, raw_publish(&url, n, false, RAW_WINDOW, a)).await?);
            raw_occ.push(cpu_measured(n, raw_publish(&url, n, true, RAW_WINDOW, a)).await?);
            // Fewer in flight than the raw pipeline: the server then reads
            // and acks in smaller chunks, which costs raw and Sluice alike.
            if concurrency != RAW_WINDOW {
                raw_same.push(cpu_measured(n, raw_publish(&url, n, false, concurrency, a)).await?);
            }
            let run = cpu_measured(n, async {
                let r = sluice_append(&store, n, a, concurrency, true).await?;
                latency.push((r.p50, r.p99));
                Ok(r.eps)
            })
            .await?;
            sluice.push(run);
            let run = cpu_measured(n, async {
                Ok(sluice_append(&store, n, a, concurrency, false).await?.eps)
            })
            .await?;
            sluice_any.push(run);
        }
        let ratio_of = |num: &[Phase], den: &[Phase]| -> Vec<f64> {
            num.iter().zip(den).map(|(s, r)| s.eps / r.eps).collect()
        };
        let (ratio_min, ratio_max) = crate::stats::range(&ratio_of(&sluice_any, &raw));
        let (ratio_occ_min, ratio_occ_max) = crate::stats::range(&ratio_of(&sluice, &raw_occ));
        let (raw, raw_occ, sluice, sluice_any) = (
            median(&raw),
            median(&raw_occ),
            median(&sluice),
            median(&sluice_any),
        );
        let raw_same = (!raw_same.is_empty()).then(|| median(&raw_same));
        let mut lat: Vec<(Duration, Duration)> = latency;
        lat.sort();
        let (p50, p99) = lat.get(lat.len() / 2).copied().unwrap_or_default();
        runs.push(json!({
            "sync_interval": name,
            "events": events,
            "group_commit": store.group_commit_stats().enabled,
            "raw_publish_per_s": raw.eps.round() as u64,
            "raw_occ_publish_per_s": raw_occ.eps.round() as u64,
            "sluice_append_any_per_s": sluice_any.eps.round() as u64,
            "sluice_append_per_s": sluice.eps.round() as u64,
            "ratio": round2(sluice_any.eps / raw.eps),
            "ratio_min": round2(ratio_min),
            "ratio_max": round2(ratio_max),
            "ratio_occ": round2(sluice.eps / raw_occ.eps),
            "ratio_occ_min": round2(ratio_occ_min),
            "ratio_occ_max": round2(ratio_occ_max),
            "ratio_exact_vs_raw": round2(sluice.eps / raw.eps),
            "raw_same_window_publish_per_s": raw_same.map(|r| r.eps.round() as u64),
            "ratio_same_window": raw_same.map(|r| round2(sluice.eps / r.eps)),
            "raw_client_us_per_event": round2(raw.client_us),
            "raw_server_us_per_event": round2(raw.server_us),
            "raw_occ_server_us_per_event": round2(raw_occ.server_us),
            "sluice_any_client_us_per_event": round2(sluice_any.client_us),
            "sluice_any_server_us_per_event": round2(sluice_any.server_us),
            "sluice_client_us_per_event": round2(sluice.client_us),
            "sluice_server_us_per_event": round2(sluice.server_us),
            "append_p50_ms": ms(p50),
            "append_p99_ms": ms(p99),
        }));
    }
    let summary = json!({
        "bench": "append",
        "aggregates": args.aggregates,
        "concurrency": concurrency,
        "raw_window": RAW_WINDOW,
        "reps": reps,
        "target_ratio": 0.9,
        "runs": runs,
    });
    if args.json {
        println!("{summary}");
        return Ok(());
    }
    println!(
        "append: {} aggregates, {} concurrent appenders, raw pipeline {} in flight, medians of {} interleaved rounds, one fresh nats-server per row",
        args.aggregates, concurrency, RAW_WINDOW, reps
    );
    println!("  ratio:     Sluice append (expected Any) / raw publish, the same headers");
    println!(
        "  OCC ratio: Sluice append (expected Exact) / raw publish carrying the same expectation header"
    );
    println!(
        "{:<8} {:>7} {:>6} {:>9} {:>9} {:>16} {:>9} {:>11} {:>16} {:>7} {:>7} {:>8}",
        "sync",
        "events",
        "group",
        "raw/s",
        "sluice/s",
        "ratio (min-max)",
        "raw+OCC/s",
        "sluice OCC/s",
        "OCC ratio",
        "p50 ms",
        "p99 ms",
        "same win"
    );
    for r in &runs {
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        println!(
            "{:<8} {:>7} {:>6} {:>9} {:>9} {:>16} {:>9} {:>11} {:>16} {:>7.2} {:>7.2} {:>8}",
            r["sync_interval"].as_str().unwrap_or(""),
            n("events"),
            if r["group_commit"] == true {
                "on"
            } else {
                "off"
            },
            n("raw_publish_per_s"),
            n("sluice_append_any_per_s"),
            format!("{} ({}-{})", r["ratio"], r["ratio_min"], r["ratio_max"]),
            n("raw_occ_publish_per_s"),
            n("sluice_append_per_s"),
            format!(
                "{} ({}-{})",
                r["ratio_occ"], r["ratio_occ_min"], r["ratio_occ_max"]
            ),
            r["append_p50_ms"].as_f64().unwrap_or(0.0),
            r["append_p99_ms"].as_f64().unwrap_or(0.0),
            r["ratio_same_window"]
                .as_f64()
                .map_or_else(|| "-".to_owned(), |x| x.to_string()),
        );
    }
    println!("CPU per event (client / nats-server, µs):");
    for r in &runs {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        println!(
            "  {:<8} raw {:.1} / {:.1}   sluice {:.1} / {:.1}   raw+OCC server {:.1}   sluice OCC {:.1} / {:.1}",
            r["sync_interval"].as_str().unwrap_or(""),
            f("raw_client_us_per_event"),
            f("raw_server_us_per_event"),
            f("sluice_any_client_us_per_event"),
            f("sluice_any_server_us_per_event"),
            f("raw_occ_server_us_per_event"),
            f("sluice_client_us_per_event"),
            f("sluice_server_us_per_event"),
        );
    }
    println!("target: ratio >= 0.9");
    Ok(())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// One measured phase: throughput and CPU per event on each side.
#[derive(Debug, Clone, Copy)]
struct Phase {
    eps: f64,
    client_us: f64,
    server_us: f64,
}

/// The phase with the median throughput.
fn median(phases: &[Phase]) -> Phase {
    let mut v = phases.to_vec();
    v.sort_by(|a, b| a.eps.total_cmp(&b.eps));
    v.get(v.len() / 2).copied().unwrap_or(Phase {
        eps: 0.0,
        client_us: 0.0,
        server_us: 0.0,
    })
}

/// Runs a phase of `events` and reads the CPU time it took in this process
/// and in its children (the nats-server), from /proc (zero elsewhere).
async fn cpu_measured(
    events: usize,
    phase: impl std::future::Future<Output = anyhow::Result<f64>>,
) -> anyhow::Result<Phase> {
    let (own0, kids0) = cpu_ticks();
    let eps = phase.await?;
    let (own1, kids1) = cpu_ticks();
    // Linux reports CPU time in clock ticks of 10 ms.
    let us = |ticks: u64| ticks as f64 * 10_000.0 / events.max(1) as f64;
    Ok(Phase {
        eps,
        client_us: us(own1.saturating_sub(own0)),
        server_us: us(kids1.saturating_sub(kids0)),
    })
}

/// CPU ticks (user + system) of this process and of its live children.
fn cpu_ticks() -> (u64, u64) {
    // Fields after the command name: state, ppid, ..., utime (12th), stime (13th).
    fn parse(stat: &str) -> Option<(u64, u64)> {
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid = f.get(1)?.parse().ok()?;
        let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        Some((ppid, ticks))
    }
    let me = u64::from(std::process::id());
    let own = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| parse(&s))
        .map_or(0, |(_, t)| t);
    let kids = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|s| parse(&s))
        .filter(|(ppid, _)| *ppid == me)
        .map(|(_, t)| t)
        .sum();
    (own, kids)
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
    let naive = raw_publish(&url, args.events_always, false, RAW_WINDOW, args.aggregates).await?;
    let mut runs = Vec::new();
    for writers in writer_counts {
        // A fresh connection per row, so the group-commit figures are its own.
        let store = EventStore::connect(&url, StoreConfig::default()).await?;
        let s = sluice_append(&store, args.events_always, args.aggregates, writers, true).await?;
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
        "events": args.events_always,
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
        args.events_always, args.aggregates
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
