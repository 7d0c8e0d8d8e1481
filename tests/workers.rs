//! Workers and dead letters against a real nats-server: ordering with
//! parallelism and replicas, retries, sequence-aware dead-lettering and
//! redrive, malformed events, crashes, advisories, shutdown.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use futures::StreamExt;
use serde_json::json;
use sluice_events::{EventStore, ExpectedVersion, NewEvent, StreamId};
use sluice_testkit::NatsServer;
use sluice_workers::dlq::{self, Filter, RedriveTarget};
use sluice_workers::{
    Delivery, HandlerError, RetryPolicy, WorkerConfig, advisory_consumer_name,
    partition_consumer_names, redrive_consumer_name,
};
use tokio_util::sync::CancellationToken;

// Durable worker names are the consumers' identity: renaming one re-consumes
// every event. Every name used here is a constant, listed in a test below.
const ORDERING: &str = "test-ordering";
const RETRYING: &str = "test-retrying";
const POISON: &str = "test-poison";
const MALFORMED: &str = "test-malformed";
const KILLED: &str = "test-killed";
const REDRIVE_TWICE: &str = "test-redrive-twice";
const DISCARD: &str = "test-discard";
const ADVISORY: &str = "test-advisory";
const SHUTDOWN: &str = "test-shutdown";
const LONG_HANDLER: &str = "test-long-handler";
const PAUSED: &str = "test-paused";
const REPARTITIONED: &str = "test-repartitioned";
const LOST_ACK: &str = "test-lost-ack";
const TAKEOVER: &str = "test-takeover";
const STANDBY: &str = "test-standby";
const OVERSIZED: &str = "test-oversized";
const BEFORE_HEAD: &str = "test-before-head";

const EVENT_TYPE: &str = "test.counted.v1";

/// Short timings so the suite stays fast; the ratios the runtime checks
/// (retry cap < ack wait < pin timeout) still hold.
fn config(name: &'static str) -> WorkerConfig {
    let mut c = WorkerConfig::new(name);
    c.ack_wait = Duration::from_secs(2);
    c.pin_timeout = Duration::from_secs(3);
    c.retry = RetryPolicy {
        base: Duration::from_millis(50),
        cap: Duration::from_secs(1),
        max_attempts: 5,
    };
    c
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn append(store: &EventStore, agg: &str, n: u64) -> u64 {
    let sid = StreamId::new("acct", agg).unwrap();
    let ev = NewEvent::json(EVENT_TYPE, &json!({ "n": n })).unwrap();
    store
        .append(&sid, ExpectedVersion::Any, vec![ev])
        .await
        .unwrap()
        .version
}

async fn append_many(store: &EventStore, agg: &str, from: u64, to: u64) {
    let sid = StreamId::new("acct", agg).unwrap();
    let events = (from..=to)
        .map(|n| NewEvent::json(EVENT_TYPE, &json!({ "n": n })).unwrap())
        .collect();
    store
        .append(&sid, ExpectedVersion::Any, events)
        .await
        .unwrap();
}

fn n_of(d: &Delivery) -> u64 {
    d.envelope.data_as::<serde_json::Value>().unwrap()["n"]
        .as_u64()
        .unwrap()
}

/// Handled `n`s per aggregate id, in handling order.
type Log = Arc<Mutex<HashMap<String, Vec<u64>>>>;

fn record(log: &Log, d: &Delivery) {
    log.lock()
        .unwrap()
        .entry(d.stream_id.id().to_owned())
        .or_default()
        .push(n_of(d));
}

fn handled(log: &Log) -> usize {
    log.lock().unwrap().values().map(Vec::len).sum()
}

/// Logs to the test output with `RUST_LOG=sluice_workers=debug`.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn spawn_worker<F, Fut>(
    store: &EventStore,
    config: WorkerConfig,
    handler: F,
) -> (CancellationToken, tokio::task::JoinHandle<()>)
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    init_tracing();
    let cancel = CancellationToken::new();
    let store = store.clone();
    let token = cancel.clone();
    let task = tokio::spawn(async move {
        sluice_workers::run(&store, config, handler, token)
            .await
            .expect("worker failed");
    });
    (cancel, task)
}

async fn dlq_count(store: &EventStore, consumer: &str) -> usize {
    dlq::list(
        store,
        &Filter {
            consumer: Some(consumer.to_owned()),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .count()
}

#[test]
fn durable_consumer_names_are_constants() {
    let names = [
        ORDERING,
        RETRYING,
        POISON,
        MALFORMED,
        KILLED,
        REDRIVE_TWICE,
        DISCARD,
        ADVISORY,
        SHUTDOWN,
        LONG_HANDLER,
        PAUSED,
        REPARTITIONED,
        LOST_ACK,
        TAKEOVER,
        STANDBY,
        OVERSIZED,
        BEFORE_HEAD,
    ];
    assert_eq!(
        names.iter().collect::<HashSet<_>>().len(),
        names.len(),
        "duplicate worker names"
    );
    for n in names {
        WorkerConfig::new(n).validate().unwrap();
    }
    // The derived JetStream consumer names are part of the contract too.
    assert_eq!(partition_consumer_names(ORDERING, 1), vec!["test-ordering"]);
    assert_eq!(
        partition_consumer_names(ORDERING, 2),
        vec!["test-ordering-p0-of-2", "test-ordering-p1-of-2"]
    );
    assert_eq!(redrive_consumer_name(POISON), "test-poison-redrive");
    assert_eq!(advisory_consumer_name(POISON), "test-poison-advisories");
}

/// 200 aggregates × 50 events, random handler delays, concurrency 8, two
/// replicas over two partitions; one replica stops half-way (the other takes
/// over its partitions). Every aggregate is handled exactly 1..=50 in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_with_parallelism_and_two_replicas() {
    let server = NatsServer::start();
    let store = server.store().await;
    // Interleave aggregates: 5 rounds of 10 events each.
    for round in 0..5u64 {
        let appends = (0..200).map(|a| {
            let store = store.clone();
            async move {
                append_many(&store, &format!("o-{a}"), round * 10 + 1, round * 10 + 10).await;
            }
        });
        futures::future::join_all(appends).await;
    }
    let log: Log = Arc::default();
    let handler = |log: Log| {
        move |d: Delivery| {
            let log = log.clone();
            async move {
                // A pseudo-random 0-2 ms delay, different per event.
                let ms = d.sequence.wrapping_mul(2_654_435_761) % 3;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                record(&log, &d);
                Ok(())
            }
        }
    };
    let mut c = config(ORDERING);
    c.partitions = 2;
    c.concurrency = 8;
    let store_b = server.store().await;
    let (cancel_a, task_a) = spawn_worker(&store, c.clone(), handler(log.clone()));
    let (cancel_b, task_b) = spawn_worker(&store_b, c, handler(log.clone()));

    wait_until("a third handled", Duration::from_secs(30), async || {
        handled(&log) >= 3000
    })
    .await;
    cancel_a.cancel();
    task_a.await.unwrap();
    wait_until("all handled", Duration::from_secs(40), async || {
        handled(&log) >= 10_000
    })
    .await;
    // Give stray duplicates a moment to show up before checking.
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel_b.cancel();
    task_b.await.unwrap();

    let log = log.lock().unwrap();
    assert_eq!(log.len(), 200);
    let expected: Vec<u64> = (1..=50).collect();
    for (agg, seen) in log.iter() {
        assert_eq!(
            seen, &expected,
            "aggregate {agg} out of order or duplicated"
        );
    }
}

/// A handler failing its first 3 attempts is retried with growing delays,
/// then succeeds; nothing reaches the DLQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_retry_with_growing_delays() {
    let server = NatsServer::start();
    let store = server.store().await;
    append(&store, "t-1", 1).await;
    append(&store, "t-1", 2).await;
    let attempts: Arc<Mutex<Vec<(u64, u64, Instant)>>> = Arc::default();
    let seen = attempts.clone();
    let mut c = config(RETRYING);
    c.retry.base = Duration::from_millis(200);
    let (cancel, task) = spawn_worker(&store, c, move |d: Delivery| {
        let seen = seen.clone();
        async move {
            let n = n_of(&d);
            seen.lock().unwrap().push((n, d.attempt, Instant::now()));
            if n == 1 && d.attempt <= 3 {
                return Err(HandlerError::transient("database down"));
            }
            Ok(())
        }
    });
    wait_until("both events handled", Duration::from_secs(15), async || {
        attempts.lock().unwrap().iter().any(|(n, _, _)| *n == 2)
    })
    .await;
    cancel.cancel();
    task.await.unwrap();
    let attempts = attempts.lock().unwrap().clone();
    let first: Vec<_> = attempts.iter().filter(|(n, _, _)| *n == 1).collect();
    assert_eq!(
        first.iter().map(|(_, a, _)| *a).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let gaps: Vec<Duration> = first.windows(2).map(|w| w[1].2 - w[0].2).collect();
    // Equal jitter: the delay after attempt n lies in [c_n/2, c_n] with
    // c = 200 ms * 2^(n-1), so each gap is at least the previous ceiling/2.
    assert!(gaps[0] >= Duration::from_millis(90), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(190), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_millis(390), "{gaps:?}");
    assert!(gaps[2] > gaps[0], "delays do not grow: {gaps:?}");
    // Event 2 of the aggregate waited behind event 1's retries.
    let order: Vec<u64> = attempts.iter().map(|(n, _, _)| *n).collect();
    assert_eq!(order, vec![1, 1, 1, 1, 2]);
    assert_eq!(dlq_count(&store, RETRYING).await, 0);
}

/// Poison event at position 10 of X: X's later events are parked (also
/// after a worker restart), every other aggregate completes; after fixing
/// the handler and redriving, X completes 10..=51 in order; every event is
/// handled exactly once overall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_event_parks_its_aggregate_until_redrive() {
    let server = NatsServer::start();
    let store = server.store().await;
    for a in 0..20 {
        append_many(&store, &format!("p-{a}"), 1, 50).await;
    }
    let log: Log = Arc::default();
    let broken = Arc::new(AtomicBool::new(true));
    let handler = |log: Log, broken: Arc<AtomicBool>| {
        move |d: Delivery| {
            let log = log.clone();
            let broken = broken.clone();
            async move {
                if d.stream_id.id() == "p-7" && n_of(&d) == 10 && broken.load(Ordering::SeqCst) {
                    return Err(HandlerError::permanent("rejected: amount over limit"));
                }
                record(&log, &d);
                Ok(())
            }
        }
    };
    let (cancel, task) = spawn_worker(&store, config(POISON), handler(log.clone(), broken.clone()));
    wait_until("others complete", Duration::from_secs(20), async || {
        handled(&log) >= 19 * 50 + 9
    })
    .await;
    wait_until(
        "head and parked in the DLQ",
        Duration::from_secs(10),
        async || dlq_count(&store, POISON).await == 41,
    )
    .await;
    cancel.cancel();
    task.await.unwrap();

    let listing = dlq::list(
        &store,
        &Filter {
            consumer: Some(POISON.into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let head = &listing.entries[0];
    assert_eq!(head.kind, "handler");
    assert!(head.reason.contains("amount over limit"), "{}", head.reason);
    assert_eq!(head.subject, "events.acct.p-7");
    assert_eq!(head.headers["ce-type"], vec![EVENT_TYPE.to_owned()]);
    for parked in &listing.entries[1..] {
        assert_eq!(parked.kind, "parked");
        assert_eq!(parked.parked_behind, Some(head.sequence));
    }
    assert_eq!(listing.groups.len(), 1);
    assert_eq!(listing.groups[0].count, 41);
    // Redriving a parked one alone would break the aggregate's order.
    let err = dlq::redrive(&store, RedriveTarget::Id(listing.entries[5].id))
        .await
        .unwrap_err();
    assert!(
        matches!(err, sluice_workers::Error::NotHead { .. }),
        "{err}"
    );

    // The parked set survives a restart: a new event of X is parked too.
    let x = StreamId::new("acct", "p-7").unwrap();
    assert!(dlq::parked(&store, POISON, &x).await.unwrap().is_some());
    let (cancel, task) = spawn_worker(&store, config(POISON), handler(log.clone(), broken.clone()));
    append(&store, "p-7", 51).await;
    append(&store, "p-8", 51).await;
    wait_until("new event parked", Duration::from_secs(10), async || {
        dlq_count(&store, POISON).await == 42
    })
    .await;
    wait_until(
        "other aggregate flows",
        Duration::from_secs(10),
        async || handled(&log) > 19 * 50 + 9,
    )
    .await;
    assert_eq!(log.lock().unwrap()["p-7"], (1..=9).collect::<Vec<u64>>());

    broken.store(false, Ordering::SeqCst);
    let report = dlq::redrive(
        &store,
        RedriveTarget::Consumer {
            consumer: POISON.into(),
            category: Some("acct".into()),
            limit: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(report.redriven.len(), 42);
    wait_until("X completes", Duration::from_secs(15), async || {
        log.lock().unwrap()["p-7"].len() >= 51
    })
    .await;
    wait_until("X released", Duration::from_secs(5), async || {
        dlq::parked(&store, POISON, &x).await.unwrap().is_none()
    })
    .await;
    // Released: a later event of X is handled directly.
    append(&store, "p-7", 52).await;
    wait_until("X flows again", Duration::from_secs(10), async || {
        log.lock().unwrap()["p-7"].len() >= 52
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel.cancel();
    task.await.unwrap();

    {
        let log = log.lock().unwrap();
        assert_eq!(log["p-7"], (1..=52).collect::<Vec<u64>>());
        assert_eq!(log["p-8"], (1..=51).collect::<Vec<u64>>());
        for a in (0..20).filter(|a| *a != 7 && *a != 8) {
            assert_eq!(log[&format!("p-{a}")], (1..=50).collect::<Vec<u64>>());
        }
    }
    assert_eq!(dlq_count(&store, POISON).await, 0);
    // EVENTS was never appended to by the redrive.
    let state = store.stream_state().await.unwrap();
    assert_eq!(state.messages, 20 * 50 + 3);
}

/// Events published by a raw NATS client that break the contract land in
/// the DLQ with distinct, precise reasons; a panic is a permanent failure;
/// the worker keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_are_dead_lettered_with_distinct_reasons() {
    let server = NatsServer::start();
    let store = server.store().await;
    let raw = server.client().await;
    let rawjs = async_nats::jetstream::new(raw);
    let headers = |drop: &str, ce_type: &str, content_type: &str| {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "raw-1"),
            ("ce-source", "urn:raw-client"),
            ("ce-type", ce_type),
            ("Content-Type", content_type),
        ] {
            if k != drop {
                h.insert(k, v);
            }
        }
        h
    };
    let cases: Vec<(&str, HeaderMap, &[u8], &str)> = vec![
        (
            "events.raw.bad-json",
            headers("", EVENT_TYPE, "application/json"),
            b"{not json",
            "not valid JSON",
        ),
        (
            "events.raw.no-type",
            headers("ce-type", EVENT_TYPE, "application/json"),
            b"{}",
            "missing required CloudEvents attribute \"type\"",
        ),
        (
            "events.raw.unknown-type",
            headers("", "test.mystery.v9", "application/json"),
            b"{}",
            "unknown event type \"test.mystery.v9\"",
        ),
        (
            "events.raw.wrong-content-type",
            headers("", EVENT_TYPE, "text/plain"),
            b"hello",
            "unsupported content type \"text/plain\"",
        ),
        (
            "events.raw.panics",
            headers("", "test.panic.v1", "application/json"),
            b"{}",
            "handler panicked: boom",
        ),
        (
            "events.not-an-aggregate",
            headers("", EVENT_TYPE, "application/json"),
            b"{}",
            "is not of the form events.<category>.<id>",
        ),
    ];
    for (subject, h, body, _) in &cases {
        rawjs
            .publish_with_headers(subject.to_string(), h.clone(), body.to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    append(&store, "fine", 1).await;
    let ok = Arc::new(AtomicU64::new(0));
    let okc = ok.clone();
    let (cancel, task) = spawn_worker(&store, config(MALFORMED), move |d: Delivery| {
        let ok = okc.clone();
        async move {
            match d.envelope.event_type.as_str() {
                EVENT_TYPE => {
                    ok.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
                "test.panic.v1" => panic!("boom"),
                _ => Err(HandlerError::unknown_type(&d.envelope)),
            }
        }
    });
    wait_until("all dead-lettered", Duration::from_secs(15), async || {
        dlq_count(&store, MALFORMED).await == cases.len()
    })
    .await;
    wait_until(
        "the good event handled",
        Duration::from_secs(5),
        async || ok.load(Ordering::SeqCst) == 1,
    )
    .await;
    // Still running: a later event is handled too.
    append(&store, "fine", 2).await;
    wait_until("worker still running", Duration::from_secs(5), async || {
        ok.load(Ordering::SeqCst) == 2
    })
    .await;
    cancel.cancel();
    task.await.unwrap();

    let listing = dlq::list(&store, &Filter::default()).await.unwrap();
    let mut reasons = HashSet::new();
    for (subject, _, body, expected) in &cases {
        let e = listing
            .entries
            .iter()
            .find(|e| e.subject == *subject)
            .unwrap_or_else(|| panic!("{subject} not dead-lettered"));
        assert!(e.reason.contains(expected), "{subject}: {}", e.reason);
        assert_eq!(&e.body[..], *body, "the original body is kept");
        assert_eq!(e.stream, "EVENTS");
        reasons.insert(e.reason.clone());
    }
    assert_eq!(reasons.len(), cases.len(), "reasons are not distinct");
    let panicked = listing
        .entries
        .iter()
        .find(|e| e.subject == "events.raw.panics")
        .unwrap();
    assert_eq!(panicked.kind, "panic");
    let bad = listing
        .entries
        .iter()
        .find(|e| e.subject == "events.not-an-aggregate")
        .unwrap();
    assert_eq!(bad.category, sluice_workers::INVALID_CATEGORY);
    // The reason filter works on the listing.
    let json_only = dlq::list(
        &store,
        &Filter {
            reason: Some("NOT VALID JSON".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(json_only.count(), 1);
    // show() gives the full record: every contract header is there.
    let shown = dlq::show(&store, json_only.entries[0].id).await.unwrap();
    for h in [
        "Sluice-Dlq-Reason",
        "Sluice-Dlq-Stream",
        "Sluice-Dlq-Sequence",
        "Sluice-Dlq-Consumer",
        "Sluice-Dlq-Deliveries",
        "Sluice-Dlq-Failed-At",
        "ce-id",
        "ce-source",
    ] {
        assert!(shown.headers.contains_key(h), "missing {h}");
    }
    assert_eq!(
        shown.headers["Nats-Msg-Id"],
        vec![format!("EVENTS:{MALFORMED}:{}", shown.sequence)]
    );
}

/// A worker aborted mid-batch (its handlers dropped half-way): after a
/// restart nothing is lost and every effect (keyed by event id) is applied
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_loses_nothing_and_applies_effects_once() {
    let server = NatsServer::start();
    let store = server.store().await;
    for a in 0..50 {
        append_many(&store, &format!("k-{a}"), 1, 20).await;
    }
    let effects: Arc<Mutex<HashSet<String>>> = Arc::default();
    let calls = Arc::new(AtomicU64::new(0));
    let handler = |effects: Arc<Mutex<HashSet<String>>>, calls: Arc<AtomicU64>| {
        move |d: Delivery| {
            let effects = effects.clone();
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                // The effect is keyed by event id: applying it twice is a no-op.
                effects.lock().unwrap().insert(d.envelope.id.to_string());
                eprintln!(
                    "HANDLED {} {} attempt={}",
                    d.stream_id.id(),
                    d.sequence,
                    d.attempt
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(())
            }
        }
    };
    let (_cancel, task) = spawn_worker(
        &store,
        config(KILLED),
        handler(effects.clone(), calls.clone()),
    );
    wait_until("some handled", Duration::from_secs(20), async || {
        effects.lock().unwrap().len() >= 300
    })
    .await;
    task.abort();
    let _ = task.await;
    let at_kill = effects.lock().unwrap().len();
    assert!(at_kill < 1000, "killed too late to show anything");

    let store2 = server.store().await;
    let (cancel, task) = spawn_worker(
        &store2,
        config(KILLED),
        handler(effects.clone(), calls.clone()),
    );
    wait_until("all applied", Duration::from_secs(30), async || {
        effects.lock().unwrap().len() >= 1000
    })
    .await;
    cancel.cancel();
    task.await.unwrap();
    assert_eq!(effects.lock().unwrap().len(), 1000);
    assert!(calls.load(Ordering::SeqCst) >= 1000);
    assert_eq!(dlq_count(&store, KILLED).await, 0);
}

/// Redriving the same dead letter twice hands it back once: the event is
/// handled once more, not twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_twice_processes_once() {
    let server = NatsServer::start();
    let store = server.store().await;
    append(&store, "r-1", 1).await;
    let calls = Arc::new(AtomicU64::new(0));
    let fixed = Arc::new(AtomicBool::new(false));
    let (c2, f2) = (calls.clone(), fixed.clone());
    let (cancel, task) = spawn_worker(&store, config(REDRIVE_TWICE), move |d: Delivery| {
        let calls = c2.clone();
        let fixed = f2.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            if fixed.load(Ordering::SeqCst) {
                assert!(d.redriven);
                Ok(())
            } else {
                Err(HandlerError::permanent("not yet"))
            }
        }
    });
    wait_until("dead-lettered", Duration::from_secs(10), async || {
        dlq_count(&store, REDRIVE_TWICE).await == 1
    })
    .await;
    let id = dlq::list(&store, &Filter::default()).await.unwrap().entries[0].id;
    fixed.store(true, Ordering::SeqCst);
    let first = dlq::redrive(&store, RedriveTarget::Id(id)).await.unwrap();
    let second = dlq::redrive(&store, RedriveTarget::Id(id)).await.unwrap();
    assert_eq!(first.redriven, vec![id]);
    assert!(second.redriven.is_empty());
    assert_eq!(second.already_redriven, vec![id]);
    let again = dlq::redrive(
        &store,
        RedriveTarget::Consumer {
            consumer: REDRIVE_TWICE.into(),
            category: None,
            limit: None,
        },
    )
    .await
    .unwrap();
    assert!(again.redriven.is_empty());
    wait_until("redriven handled", Duration::from_secs(10), async || {
        calls.load(Ordering::SeqCst) >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    cancel.cancel();
    task.await.unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one failure, one redriven success"
    );
    let trail = dlq::audit_trail(&store, id).await.unwrap();
    assert_eq!(trail.len(), 1);
    assert_eq!(trail[0]["action"], "redrive");
}

/// Discarding keeps the reason for audit, moves the parked head, and
/// releases the aggregate once nothing of it is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_keeps_a_reason_and_releases_the_aggregate() {
    let server = NatsServer::start();
    let store = server.store().await;
    append_many(&store, "d-1", 1, 2).await;
    let log: Log = Arc::default();
    let l2 = log.clone();
    let (cancel, task) = spawn_worker(&store, config(DISCARD), move |d: Delivery| {
        let log = l2.clone();
        async move {
            if n_of(&d) == 1 {
                return Err(HandlerError::permanent("bad first event"));
            }
            record(&log, &d);
            Ok(())
        }
    });
    wait_until("head and parked", Duration::from_secs(10), async || {
        dlq_count(&store, DISCARD).await == 2
    })
    .await;
    let entries = dlq::list(&store, &Filter::default()).await.unwrap().entries;
    assert!(matches!(
        dlq::discard(&store, entries[0].id, "  ").await,
        Err(sluice_workers::Error::MissingReason)
    ));
    dlq::discard(&store, entries[0].id, "duplicate of a manual correction")
        .await
        .unwrap();
    let x = StreamId::new("acct", "d-1").unwrap();
    let parked = dlq::parked(&store, DISCARD, &x).await.unwrap().unwrap();
    assert_eq!(parked.head, entries[1].sequence);
    let trail = dlq::audit_trail(&store, entries[0].id).await.unwrap();
    assert_eq!(trail[0]["action"], "discard");
    assert_eq!(trail[0]["reason"], "duplicate of a manual correction");
    // Redriving the new head hands event 2 back; the aggregate is released.
    dlq::redrive(&store, RedriveTarget::Id(entries[1].id))
        .await
        .unwrap();
    wait_until("event 2 handled", Duration::from_secs(10), async || {
        handled(&log) == 1
    })
    .await;
    wait_until("released", Duration::from_secs(5), async || {
        dlq::parked(&store, DISCARD, &x).await.unwrap().is_none()
    })
    .await;
    append(&store, "d-1", 3).await;
    wait_until("event 3 handled", Duration::from_secs(10), async || {
        handled(&log) == 2
    })
    .await;
    cancel.cancel();
    task.await.unwrap();
    assert_eq!(log.lock().unwrap()["d-1"], vec![2, 3]);
}

/// An event near the server's `max_payload` (over the worker's 256 KiB
/// limit) is dead-lettered as `PayloadTooLarge` by reference, since its
/// copy plus the dead-letter headers cannot fit; its aggregate is parked,
/// others keep flowing; a redrive (to a worker allowed larger events) hands
/// the original back from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_max_payload_events_are_dead_lettered_by_reference() {
    let server = NatsServer::start();
    let store = server.store().await;
    let js = store.jetstream().clone();
    append(&store, "small", 1).await;
    let max = store.client().server_info().max_payload;
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "big-1"),
        ("ce-source", "urn:raw-client"),
        ("ce-type", EVENT_TYPE),
        ("Content-Type", "application/json"),
    ] {
        h.insert(k, v);
    }
    let body = format!(r#"{{"n":7,"pad":"{}"}}"#, "x".repeat(max - 400));
    let big_seq = js
        .publish_with_headers("events.acct.big", h, body.clone().into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    append(&store, "big", 8).await;
    append(&store, "small", 2).await;
    let log: Log = Arc::default();
    let l2 = log.clone();
    let handler = move |d: Delivery| {
        let log = l2.clone();
        async move {
            record(&log, &d);
            Ok(())
        }
    };
    let (cancel, task) = spawn_worker(&store, config(OVERSIZED), handler.clone());
    wait_until(
        "big and its follower dead-lettered",
        Duration::from_secs(10),
        async || dlq_count(&store, OVERSIZED).await == 2,
    )
    .await;
    wait_until(
        "the other aggregate flowed",
        Duration::from_secs(10),
        async || log.lock().unwrap().get("small").map(Vec::len) == Some(2),
    )
    .await;
    let entries = dlq::list(&store, &Filter::default()).await.unwrap().entries;
    let head = entries.iter().find(|e| e.sequence == big_seq).unwrap();
    assert!(
        head.reason.starts_with("PayloadTooLarge"),
        "{}",
        head.reason
    );
    assert!(
        head.by_reference && head.body.is_empty(),
        "{:?}",
        head.headers
    );
    assert_eq!(head.event_type.as_deref(), Some(EVENT_TYPE));
    let raw = js
        .get_stream("DLQ")
        .await
        .unwrap()
        .direct_get(head.id)
        .await
        .unwrap();
    assert!(raw.payload.is_empty());
    assert_eq!(
        raw.headers.get("Sluice-Dlq-Body").unwrap().as_str(),
        "reference"
    );
    let shown = dlq::show(&store, head.id).await.unwrap();
    assert_eq!(shown.body, body.as_bytes());
    cancel.cancel();
    task.await.unwrap();
    assert!(!log.lock().unwrap().contains_key("big"));

    // Redrive to a worker that accepts larger events: the original comes
    // back from the log, in order with what was parked behind it.
    let mut bigger = config(OVERSIZED);
    bigger.max_payload = 2 * max;
    let (cancel, task) = spawn_worker(&store, bigger, handler);
    let report = dlq::redrive(&store, RedriveTarget::Id(head.id))
        .await
        .unwrap();
    assert_eq!(report.redriven.len(), 2);
    wait_until(
        "big handled after redrive",
        Duration::from_secs(10),
        async || log.lock().unwrap().get("big").map(Vec::len) == Some(2),
    )
    .await;
    cancel.cancel();
    task.await.unwrap();
    assert_eq!(log.lock().unwrap()["big"], vec![7, 8]);
    assert_eq!(dlq_count(&store, OVERSIZED).await, 0);
}

/// A consumer that never acks (a worker crashing on a message) exhausts
/// max_deliver; the server's advisory becomes a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_deliveries_advisory_leaves_a_dead_letter() {
    let server = NatsServer::start();
    let store = server.store().await;
    let mut c = config(ADVISORY);
    c.ack_wait = Duration::from_millis(500);
    c.pin_timeout = Duration::from_secs(1);
    c.retry.cap = Duration::from_millis(200);
    c.retry.max_attempts = 1;
    let consumers = sluice_workers::ensure_consumers(&store, &c).await.unwrap();
    append(&store, "a-1", 1).await;
    // A "worker" that receives the message and dies before acking, each time.
    let mut messages = consumers[0]
        .stream()
        .group("sluice")
        .expires(Duration::from_millis(200))
        .heartbeat(Duration::from_millis(50))
        .messages()
        .await
        .unwrap();
    let mut deliveries = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && deliveries < 3 {
        if let Ok(Some(Ok(_))) =
            tokio::time::timeout(Duration::from_millis(300), messages.next()).await
        {
            deliveries += 1;
        }
    }
    assert_eq!(deliveries, 3, "max_deliver = max_attempts + 2");
    drop(messages);
    let (cancel, task) = spawn_worker(&store, c, |_d: Delivery| async {
        panic!("the advisory path must not run the handler")
    });
    wait_until("advisory recorded", Duration::from_secs(10), async || {
        dlq_count(&store, ADVISORY).await == 1
    })
    .await;
    cancel.cancel();
    task.await.unwrap();
    let e = &dlq::list(&store, &Filter::default()).await.unwrap().entries[0];
    assert_eq!(e.kind, "advisory");
    assert!(
        e.reason.contains("gave up after 3 deliveries"),
        "{}",
        e.reason
    );
    assert_eq!(e.subject, "events.acct.a-1");
    let x = StreamId::new("acct", "a-1").unwrap();
    assert!(dlq::parked(&store, ADVISORY, &x).await.unwrap().is_some());
}

/// Cancelling stops fetching, lets the running handler finish and ack, and
/// returns; nothing is left unacknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_work() {
    let server = NatsServer::start();
    let store = server.store().await;
    let js = store.jetstream().clone();
    append_many(&store, "s-1", 1, 5).await;
    let started = Arc::new(AtomicU64::new(0));
    let finished: Log = Arc::default();
    let handler = |started: Arc<AtomicU64>, finished: Log| {
        move |d: Delivery| {
            let (started, finished) = (started.clone(), finished.clone());
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(400)).await;
                record(&finished, &d);
                Ok(())
            }
        }
    };
    let mut c = config(SHUTDOWN);
    c.concurrency = 1;
    let (cancel, task) = spawn_worker(
        &store,
        c.clone(),
        handler(started.clone(), finished.clone()),
    );
    wait_until("one started", Duration::from_secs(10), async || {
        started.load(Ordering::SeqCst) >= 1
    })
    .await;
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("shutdown hangs")
        .unwrap();
    let done = handled(&finished) as u64;
    assert_eq!(
        started.load(Ordering::SeqCst),
        done,
        "a handler was cut off"
    );
    assert!(done < 5, "shutdown did not stop fetching");
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream("EVENTS")
        .await
        .unwrap()
        .get_consumer(SHUTDOWN)
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(
        info.ack_floor.stream_sequence, done,
        "finished work was acked"
    );
    // The rest was handed back: a new worker handles it, once, in order.
    let (cancel, task) = spawn_worker(&store, c, handler(started.clone(), finished.clone()));
    wait_until("the rest handled", Duration::from_secs(15), async || {
        handled(&finished) >= 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    cancel.cancel();
    task.await.unwrap();
    assert_eq!(finished.lock().unwrap()["s-1"], vec![1, 2, 3, 4, 5]);
}

/// A handler running longer than the ack wait is kept alive by in-progress
/// acks: it runs once, not again on redelivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_handlers_are_kept_alive_with_progress_acks() {
    let server = NatsServer::start();
    let store = server.store().await;
    append(&store, "l-1", 1).await;
    let calls: Arc<Mutex<Vec<u64>>> = Arc::default();
    let c2 = calls.clone();
    let mut c = config(LONG_HANDLER);
    c.ack_wait = Duration::from_secs(1);
    c.retry.cap = Duration::from_millis(500);
    let (cancel, task) = spawn_worker(&store, c, move |d: Delivery| {
        let calls = c2.clone();
        async move {
            calls.lock().unwrap().push(d.attempt);
            tokio::time::sleep(Duration::from_millis(2600)).await;
            Ok(())
        }
    });
    tokio::time::sleep(Duration::from_millis(3500)).await;
    cancel.cancel();
    task.await.unwrap();
    assert_eq!(*calls.lock().unwrap(), vec![1]);
}

/// The kill switch: pausing a worker stops deliveries at the server (the
/// listing shows the backlog), resuming lets it continue where it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_a_worker() {
    let server = NatsServer::start();
    let store = server.store().await;
    let log: Log = Arc::default();
    let l2 = log.clone();
    let mut c = config(PAUSED);
    c.partitions = 2;
    let (cancel, task) = spawn_worker(&store, c, move |d: Delivery| {
        let log = l2.clone();
        async move {
            record(&log, &d);
            Ok(())
        }
    });
    append(&store, "z-1", 1).await;
    wait_until("first handled", Duration::from_secs(10), async || {
        handled(&log) == 1
    })
    .await;
    let paused = sluice_workers::consumers::pause(&store, PAUSED, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        paused,
        vec![
            "test-paused-p0-of-2",
            "test-paused-p1-of-2",
            "test-paused-redrive"
        ]
    );
    append_many(&store, "z-1", 2, 6).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(handled(&log), 1, "a paused consumer delivered");
    let list = sluice_workers::consumers::list(&store).await.unwrap();
    let p0 = list
        .iter()
        .find(|c| c.name == "test-paused-p0-of-2")
        .unwrap();
    assert!(p0.paused);
    assert_eq!(p0.lag, 5);
    assert!(p0.pause_remaining_secs.is_some());
    sluice_workers::consumers::resume(&store, PAUSED)
        .await
        .unwrap();
    wait_until("rest handled", Duration::from_secs(10), async || {
        handled(&log) == 6
    })
    .await;
    cancel.cancel();
    task.await.unwrap();
    assert_eq!(log.lock().unwrap()["z-1"], (1..=6).collect::<Vec<u64>>());
    let list = sluice_workers::consumers::list(&store).await.unwrap();
    assert!(list.iter().all(|c| !c.paused && c.lag == 0), "{list:?}");
}

/// Changing the partition count: stop, repartition (new consumers start at
/// the lowest old ack floor), restart; every aggregate stays in order with
/// nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repartition_keeps_order_and_loses_nothing() {
    let server = NatsServer::start();
    let store = server.store().await;
    for a in 0..10 {
        append_many(&store, &format!("r-{a}"), 1, 20).await;
    }
    let log: Log = Arc::default();
    let handler = |log: Log| {
        move |d: Delivery| {
            let log = log.clone();
            async move {
                record(&log, &d);
                Ok(())
            }
        }
    };
    let mut two = config(REPARTITIONED);
    two.partitions = 2;
    let (cancel, task) = spawn_worker(&store, two, handler(log.clone()));
    wait_until("first part handled", Duration::from_secs(10), async || {
        handled(&log) >= 200
    })
    .await;
    cancel.cancel();
    task.await.unwrap();

    let mut three = config(REPARTITIONED);
    three.partitions = 3;
    let deadline = Instant::now() + Duration::from_secs(5);
    let report = loop {
        match sluice_workers::repartition(&store, &three).await {
            Ok(r) => break r,
            // The stopped worker's last pull requests expire first.
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(
        report.removed,
        vec!["test-repartitioned-p0-of-2", "test-repartitioned-p1-of-2"]
    );
    assert_eq!(report.created.len(), 3);
    assert_eq!(report.start_sequence, 201);
    for a in 0..10 {
        append_many(&store, &format!("r-{a}"), 21, 30).await;
    }
    let (cancel, task) = spawn_worker(&store, three, handler(log.clone()));
    wait_until("rest handled", Duration::from_secs(10), async || {
        handled(&log) >= 300
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel.cancel();
    task.await.unwrap();
    let log = log.lock().unwrap();
    for a in 0..10 {
        assert_eq!(log[&format!("r-{a}")], (1..=30).collect::<Vec<u64>>());
    }
}

/// A handler whose effect is keyed by event id in `effects` (the durable
/// state: it outlives the killed worker), counting every call in `seen`; on
/// the delivery of `hang_on` (an `n`) it applies the effect and then hangs,
/// as a process killed after its effect and before its ack would.
fn effect_then_hang(
    effects: Arc<Mutex<HashSet<String>>>,
    seen: Log,
    hang_on: Option<u64>,
) -> impl Fn(Delivery) -> std::pin::Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>
+ Send
+ Sync
+ 'static {
    move |d: Delivery| {
        let (effects, seen) = (effects.clone(), seen.clone());
        Box::pin(async move {
            record(&seen, &d);
            effects.lock().unwrap().insert(d.envelope.id.to_string());
            if Some(n_of(&d)) == hang_on {
                std::future::pending::<()>().await;
            }
            Ok(())
        })
    }
}

/// Issue 12, finding 1: a worker handles event 1 of an aggregate and is
/// killed before its ack goes out; the nats-server restarts too (a restarted
/// `sluice up` stops the one its predecessor left and starts it again), so
/// the pin is gone and the new worker gets event 2 at once, while event 1
/// comes back only after its ack wait, behind it.
/// The new process has no memory of event 1: that redelivery used to be
/// dead-lettered as `late` and the aggregate parked. Now the idempotent
/// handler gets it (and finds its effect applied), nothing is dead-lettered
/// or parked, and later events keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_ack_redelivered_after_a_restart_is_not_dead_lettered_as_late() {
    let mut server = NatsServer::start();
    let mut c = config(LOST_ACK);
    c.ack_wait = Duration::from_secs(4);
    c.pin_timeout = Duration::from_secs(5);
    let effects: Arc<Mutex<HashSet<String>>> = Arc::default();
    let seen: Log = Arc::default();
    {
        let store = server.store().await;
        append(&store, "a", 1).await;
        let (_cancel, task) = spawn_worker(
            &store,
            c.clone(),
            effect_then_hang(effects.clone(), seen.clone(), Some(1)),
        );
        wait_until("event 1 applied", Duration::from_secs(10), async || {
            effects.lock().unwrap().len() == 1
        })
        .await;
        // kill -9 of the worker (its connection goes with it) and the server.
        task.abort();
        let _ = task.await;
    }
    server.restart_gracefully();
    let store = server.store().await;
    append(&store, "a", 2).await;
    let (cancel, task) = spawn_worker(
        &store,
        c.clone(),
        effect_then_hang(effects.clone(), seen.clone(), None),
    );
    wait_until(
        "event 1 redelivered behind event 2",
        Duration::from_secs(20),
        async || seen.lock().unwrap().get("a").is_some_and(|v| v.len() >= 3),
    )
    .await;
    append(&store, "a", 3).await;
    wait_until("event 3 handled", Duration::from_secs(10), async || {
        seen.lock().unwrap()["a"].contains(&3)
    })
    .await;
    cancel.cancel();
    task.await.unwrap();
    let order = seen.lock().unwrap()["a"].clone();
    // The restart is what made the redelivery late (else this test shows nothing).
    assert_eq!(&order[..3], &[1, 2, 1], "{order:?}");
    assert_eq!(effects.lock().unwrap().len(), 3);
    assert_eq!(dlq_count(&store, LOST_ACK).await, 0);
    let sid = StreamId::new("acct", "a").unwrap();
    assert_eq!(dlq::parked(&store, LOST_ACK, &sid).await.unwrap(), None);
}

/// Issue 12, finding 8: a worker is killed with messages in flight, and
/// restarted at once as the only consumer (`take_over_on_start`, what `sluice
/// up` sets). With production timings (ack wait 30 s, pin timeout 90 s) the
/// in-flight messages used to come back after the pin timeout, so a saga
/// step waiting for them (deadline 30 s) compensated. The restarted worker
/// takes the pin and resets the consumer to its ack floor: everything in
/// flight is handled again within seconds, in stream order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sole_worker_takes_in_flight_messages_over_within_seconds() {
    let server = NatsServer::start();
    let mut c = WorkerConfig::new(TAKEOVER);
    assert!(c.ack_wait >= Duration::from_secs(30) && c.pin_timeout >= Duration::from_secs(90));
    c.take_over_on_start = true;
    let effects: Arc<Mutex<HashSet<String>>> = Arc::default();
    let seen: Log = Arc::default();
    {
        let store = server.store().await;
        for agg in ["a", "b", "c"] {
            append_many(&store, agg, 1, 3).await;
        }
        let (_cancel, task) = spawn_worker(
            &store,
            c.clone(),
            effect_then_hang(effects.clone(), seen.clone(), Some(2)),
        );
        // Each aggregate hangs on its event 2 (applied, never acked); 3 is held.
        wait_until(
            "every event 2 applied",
            Duration::from_secs(10),
            async || effects.lock().unwrap().len() == 6,
        )
        .await;
        task.abort();
        let _ = task.await;
    }
    let store = server.store().await;
    let restarted = Instant::now();
    let (cancel, task) = spawn_worker(
        &store,
        c.clone(),
        effect_then_hang(effects.clone(), seen.clone(), None),
    );
    wait_until(
        "in-flight events taken over",
        Duration::from_secs(10),
        async || effects.lock().unwrap().len() == 9,
    )
    .await;
    let took = restarted.elapsed();
    cancel.cancel();
    task.await.unwrap();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    for agg in ["a", "b", "c"] {
        let order = seen.lock().unwrap()[agg].clone();
        // Before the kill 1, 2; after it, from the ack floor in stream order.
        assert_eq!(&order[..2], &[1, 2], "{agg}: {order:?}");
        let after: Vec<u64> = order[2..].to_vec();
        assert!(after.ends_with(&[2, 3]), "{agg}: {order:?}");
        assert!(after.windows(2).all(|w| w[0] < w[1]), "{agg}: {order:?}");
    }
    assert_eq!(dlq_count(&store, TAKEOVER).await, 0);
    eprintln!("took the in-flight messages over in {took:?}");
}

/// Roles mode (`sluice serve`): replicas share a consumer, so none may take
/// it over at start; a standby takes a dead replica's work over when the
/// server moves the pin, `pin_timeout` after the dead one's last pull. This
/// measures that takeover time: the in-flight messages are handled again
/// within pin timeout + a pull's expiry, and not before the pin moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_replica_takes_over_after_the_pin_timeout() {
    let server = NatsServer::start();
    let mut c = config(STANDBY);
    c.ack_wait = Duration::from_secs(2);
    c.pin_timeout = Duration::from_secs(3);
    let effects: Arc<Mutex<HashSet<String>>> = Arc::default();
    let seen: Log = Arc::default();
    let store = server.store().await;
    append_many(&store, "a", 1, 3).await;
    let first = server.store().await;
    let (_cancel, pinned) = spawn_worker(
        &first,
        c.clone(),
        effect_then_hang(effects.clone(), seen.clone(), Some(2)),
    );
    wait_until("event 2 applied", Duration::from_secs(10), async || {
        effects.lock().unwrap().len() == 2
    })
    .await;
    // The standby runs from now on; the pinned replica is then killed.
    let standby_store = server.store().await;
    let (cancel, standby) = spawn_worker(
        &standby_store,
        c.clone(),
        effect_then_hang(effects.clone(), seen.clone(), None),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    pinned.abort();
    let _ = pinned.await;
    drop(first);
    let killed = Instant::now();
    wait_until(
        "the standby took over",
        Duration::from_secs(20),
        async || effects.lock().unwrap().len() == 3,
    )
    .await;
    let took = killed.elapsed();
    cancel.cancel();
    standby.await.unwrap();
    // The pin moves after pin_timeout of silence; the dead replica's last
    // pull may have renewed it up to a pull expiry (pin_timeout / 4) before.
    let bound = c.pin_timeout + c.pin_timeout / 4 + Duration::from_secs(2);
    assert!(took <= bound, "took {took:?}, more than {bound:?}");
    let order = seen.lock().unwrap()["a"].clone();
    assert_eq!(&order[..2], &[1, 2], "{order:?}");
    assert!(order[2..].ends_with(&[2, 3]), "{order:?}");
    assert_eq!(dlq_count(&store, STANDBY).await, 0);
    eprintln!(
        "standby took over {took:?} after the kill (pin timeout {:?})",
        c.pin_timeout
    );
}

/// The `parked` half of finding 1: an aggregate parked by a real failure
/// (event 2) must not park the redelivery of an event from *before* its head
/// (event 1, applied by a killed process whose ack was lost, back after a
/// server restart): that is handled, so the kill leaves no dead letter
/// besides the real one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_from_before_a_parked_head_is_handled_not_parked() {
    let mut server = NatsServer::start();
    let mut c = config(BEFORE_HEAD);
    c.ack_wait = Duration::from_secs(4);
    c.pin_timeout = Duration::from_secs(5);
    let effects: Arc<Mutex<HashSet<String>>> = Arc::default();
    let seen: Log = Arc::default();
    {
        let store = server.store().await;
        append(&store, "a", 1).await;
        let (_cancel, task) = spawn_worker(
            &store,
            c.clone(),
            effect_then_hang(effects.clone(), seen.clone(), Some(1)),
        );
        wait_until("event 1 applied", Duration::from_secs(10), async || {
            effects.lock().unwrap().len() == 1
        })
        .await;
        task.abort();
        let _ = task.await;
    }
    server.restart_gracefully();
    let store = server.store().await;
    append(&store, "a", 2).await;
    let handler = {
        let (effects, seen) = (effects.clone(), seen.clone());
        move |d: Delivery| {
            let (effects, seen) = (effects.clone(), seen.clone());
            async move {
                record(&seen, &d);
                if n_of(&d) == 2 {
                    return Err(HandlerError::permanent("event 2 is refused"));
                }
                effects.lock().unwrap().insert(d.envelope.id.to_string());
                Ok(())
            }
        }
    };
    let (cancel, task) = spawn_worker(&store, c.clone(), handler);
    wait_until(
        "event 1 redelivered behind the parked head",
        Duration::from_secs(20),
        async || seen.lock().unwrap().get("a").is_some_and(|v| v.len() >= 3),
    )
    .await;
    // Give a wrongly parked redelivery time to reach the DLQ.
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel.cancel();
    task.await.unwrap();
    let order = seen.lock().unwrap()["a"].clone();
    assert_eq!(&order[..3], &[1, 2, 1], "{order:?}");
    let entries = dlq::list(
        &store,
        &Filter {
            consumer: Some(BEFORE_HEAD.to_owned()),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .entries;
    let kinds: Vec<&str> = entries.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, vec!["handler"], "only the real failure: {entries:?}");
    let sid = StreamId::new("acct", "a").unwrap();
    let parked = dlq::parked(&store, BEFORE_HEAD, &sid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((parked.head, parked.through), (2, 2));
}
