//! Group commit against a real nats-server 2.15.1 with `sync_interval:
//! always`: many concurrent appends share atomic batches, and every caller
//! still gets exactly its own outcome.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use sluice_events::{
    Error, EventStore, ExpectedVersion, GroupCommitConfig, NewEvent, RecordedEvent, StoreConfig,
    StreamId,
};
use sluice_testkit::NatsServer;

fn ev(writer: usize, n: u64) -> NewEvent {
    NewEvent::new("test.counted.v1", format!(r#"{{"w":{writer},"n":{n}}}"#))
}

fn n_of(e: &RecordedEvent) -> u64 {
    e.envelope.data_as::<serde_json::Value>().unwrap()["n"]
        .as_u64()
        .unwrap()
}

async fn whole_log(store: &EventStore) -> Vec<RecordedEvent> {
    store
        .read_all(1)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// One acknowledged append: aggregate, reported positions, event ids.
type Acked = (String, Vec<u64>, Vec<String>);

/// Every acknowledged event is stored once, at the position it was told,
/// and nothing else is stored.
fn assert_log_is_exactly(all: &[RecordedEvent], acked: &[Acked]) {
    let stored: HashMap<String, (String, u64)> = all
        .iter()
        .map(|e| {
            (
                e.envelope.id.to_string(),
                (e.stream_id.id().to_owned(), e.position),
            )
        })
        .collect();
    assert_eq!(stored.len(), all.len(), "an event id is stored twice");
    let mut expected = 0;
    for (aggregate, positions, ids) in acked {
        assert_eq!(positions.len(), ids.len());
        for (pos, id) in positions.iter().zip(ids) {
            assert_eq!(
                stored.get(id),
                Some(&(aggregate.clone(), *pos)),
                "acknowledged event {id} not stored where the caller was told"
            );
        }
        expected += ids.len();
    }
    assert_eq!(all.len(), expected, "the log holds unacknowledged events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_writers_twenty_thousand_appends_exactly_once() {
    let server = NatsServer::start();
    let store = server.store().await;
    const WRITERS: usize = 64;
    const TOTAL: usize = 20_000;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let id = StreamId::new("gc", format!("agg-{w}")).unwrap();
                let count = TOTAL / WRITERS + usize::from(w < TOTAL % WRITERS);
                let mut version = 0;
                let mut acked: Vec<Acked> = Vec::with_capacity(count);
                for n in 0..count as u64 {
                    let event = ev(w, n);
                    let event_id = event.id.to_string();
                    // Each append builds on the previous one: a lost or
                    // misattributed ack shows up as a conflict here.
                    let r = store
                        .append(&id, ExpectedVersion::from_version(version), vec![event])
                        .await
                        .unwrap_or_else(|e| panic!("writer {w} append {n}: {e}"));
                    assert!(r.version > version && !r.deduplicated);
                    version = r.version;
                    acked.push((id.id().to_owned(), r.positions, vec![event_id]));
                }
                acked
            })
        })
        .collect();
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_eq!(acked.len(), TOTAL);

    let all = whole_log(&store).await;
    assert_log_is_exactly(&all, &acked);
    // Per aggregate: the writer's events in order, no gaps, versions rising.
    let mut per: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for e in &all {
        per.entry(e.stream_id.id().to_owned())
            .or_default()
            .push((e.position, n_of(e)));
    }
    assert_eq!(per.len(), WRITERS);
    for (agg, events) in per {
        let ns: Vec<u64> = events.iter().map(|(_, n)| *n).collect();
        assert_eq!(ns, (0..ns.len() as u64).collect::<Vec<_>>(), "{agg}");
        assert!(events.windows(2).all(|w| w[0].0 < w[1].0), "{agg}");
    }
    let stats = store.group_commit_stats();
    assert_eq!(stats.events, TOTAL as u64);
    assert_eq!(stats.appends, TOTAL as u64);
    assert!(
        stats.batches < stats.events / 4,
        "appends were not grouped: {stats:?}"
    );
    assert_eq!(stats.conflicts_resolved, 0, "{stats:?}");
    eprintln!(
        "64 writers: {} events in {} batches (mean {:.1}, max {}), fsyncs saved {}",
        stats.events,
        stats.batches,
        stats.mean_batch_events,
        stats.max_batch_events,
        stats.fsyncs_saved
    );
}

/// What one caller was told about one append.
#[derive(Debug)]
enum Told {
    Ok(Acked),
    Conflict { aggregate: String, ids: Vec<String> },
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_contention_each_caller_is_told_its_own_outcome() {
    let server = NatsServer::start();
    let store = server
        .store_with(StoreConfig {
            group_commit: GroupCommitConfig {
                linger: Duration::from_millis(1),
                ..GroupCommitConfig::default()
            },
            ..StoreConfig::default()
        })
        .await;
    const ROUNDS: u64 = 120;
    let tasks: Vec<_> = (0..64usize)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                // Writers 0..32 share 4 hot aggregates; 32..64 own theirs.
                let hot = w < 32;
                let agg = if hot {
                    format!("hot-{}", w % 4)
                } else {
                    format!("own-{w}")
                };
                let id = StreamId::new("mix", agg.as_str()).unwrap();
                let mut told = Vec::new();
                let mut version = 0;
                for n in 0..ROUNDS {
                    if hot {
                        version = store.last_version(&id).await.unwrap();
                    }
                    // Some appends carry several events, so positions inside
                    // a shared batch are handed out per append.
                    let events: Vec<NewEvent> = (0..1 + n % 3).map(|k| ev(w, n * 10 + k)).collect();
                    let ids: Vec<String> = events.iter().map(|e| e.id.to_string()).collect();
                    match store
                        .append(&id, ExpectedVersion::from_version(version), events)
                        .await
                    {
                        Ok(r) => {
                            assert_eq!(r.positions.len(), ids.len());
                            assert_eq!(r.version, *r.positions.last().unwrap());
                            version = r.version;
                            told.push(Told::Ok((agg.clone(), r.positions, ids)));
                        }
                        Err(Error::Conflict {
                            expected, actual, ..
                        }) => {
                            assert!(hot, "writer {w} alone on {agg} was told of a conflict");
                            assert_eq!(expected, version);
                            assert_ne!(actual, expected);
                            told.push(Told::Conflict {
                                aggregate: agg.clone(),
                                ids,
                            });
                        }
                        Err(e) => panic!("writer {w}: unexpected error {e}"),
                    }
                }
                told
            })
        })
        .collect();
    let mut acked = Vec::new();
    let mut refused = Vec::new();
    for t in tasks {
        for told in t.await.unwrap() {
            match told {
                Told::Ok(a) => acked.push(a),
                Told::Conflict { aggregate, ids } => refused.push((aggregate, ids)),
            }
        }
    }
    let all = whole_log(&store).await;
    // A writer told Ok wrote exactly its events where it was told ...
    assert_log_is_exactly(&all, &acked);
    // ... and a writer told Conflict wrote nothing.
    let stored: HashSet<String> = all.iter().map(|e| e.envelope.id.to_string()).collect();
    for (agg, ids) in &refused {
        for id in ids {
            assert!(
                !stored.contains(id),
                "{agg}: event {id} of a refused append is in the log"
            );
        }
    }
    let stats = store.group_commit_stats();
    assert!(
        !refused.is_empty(),
        "8 writers per hot aggregate must conflict"
    );
    assert!(
        stats.split_batches > 0 && stats.conflicts_resolved > 0,
        "conflicts never went through a shared batch: {stats:?}"
    );
    assert!(stats.batches < stats.appends, "{stats:?}");
    eprintln!(
        "mixed: {} ok, {} conflicts; {stats:?}",
        acked.len(),
        refused.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_minus_nine_mid_run_keeps_every_ack_and_no_half_batch() {
    let mut server = NatsServer::start();
    let url = server.url();
    let config = StoreConfig {
        request_timeout: Duration::from_secs(2),
        ..StoreConfig::default()
    };
    let store = server.store_with(config.clone()).await;
    const WRITERS: usize = 48;
    const PER_WRITER: u64 = 120;
    let acked_count = Arc::new(Mutex::new(0usize));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            let acked_count = acked_count.clone();
            tokio::spawn(async move {
                let id = StreamId::new("k9", format!("w{w}")).unwrap();
                let mut version = 0;
                let mut acked: Vec<Acked> = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(40);
                for n in 0..PER_WRITER {
                    let events = vec![ev(w, 2 * n), ev(w, 2 * n + 1)];
                    let ids: Vec<String> = events.iter().map(|e| e.id.to_string()).collect();
                    // Unknown outcome (server down): retry the very same append
                    // (same ids, same expectation) until it is decided.
                    loop {
                        assert!(Instant::now() < deadline, "writer {w} stuck");
                        match store
                            .append(&id, ExpectedVersion::from_version(version), events.clone())
                            .await
                        {
                            Ok(r) => {
                                version = r.version;
                                acked.push((id.id().to_owned(), r.positions, ids));
                                *acked_count.lock().unwrap() += 1;
                                break;
                            }
                            Err(e) if e.is_conflict() => panic!("writer {w} alone conflicted: {e}"),
                            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    }
                }
                acked
            })
        })
        .collect();
    // Let a good part land, then kill -9 mid-run and bring it back.
    let deadline = Instant::now() + Duration::from_secs(30);
    while *acked_count.lock().unwrap() < WRITERS * PER_WRITER as usize / 3
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats_before = store.group_commit_stats();
    server.restart();
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert_eq!(acked.len(), WRITERS * PER_WRITER as usize);
    eprintln!(
        "kill -9: stats of the writing store {:?}",
        store.group_commit_stats()
    );
    assert!(
        stats_before.batches < stats_before.appends,
        "the run was not batched before the kill: {stats_before:?}"
    );

    let store = EventStore::connect(&url, config).await.unwrap();
    let all = whole_log(&store).await;
    // Every acknowledged event, once, where the caller was told; nothing else
    // (writers retried every unknown outcome until it was decided).
    assert_log_is_exactly(&all, &acked);
    // No half batch: every batch present in the log is whole (sequence
    // 1..=n, the last one the commit), and its messages are contiguous.
    let stream = store.jetstream().get_stream("EVENTS").await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut batches: HashMap<String, Vec<(u64, u64, bool)>> = HashMap::new();
    let mut seen = 0;
    let mut with_batch_headers = 0;
    while seen < all.len() {
        let m = messages.next().await.unwrap().unwrap();
        seen += 1;
        let seq = m.info().unwrap().stream_sequence;
        let h = m.headers.clone().unwrap_or_default();
        if let Some(batch) = h.get("Nats-Batch-Id") {
            with_batch_headers += 1;
            let bseq: u64 = h
                .get("Nats-Batch-Sequence")
                .unwrap()
                .as_str()
                .parse()
                .unwrap();
            let commit = h.get("Nats-Batch-Commit").is_some();
            batches
                .entry(batch.to_string())
                .or_default()
                .push((seq, bseq, commit));
        }
    }
    for (batch, mut msgs) in batches {
        msgs.sort_unstable();
        let bseqs: Vec<u64> = msgs.iter().map(|m| m.1).collect();
        assert_eq!(
            bseqs,
            (1..=msgs.len() as u64).collect::<Vec<_>>(),
            "batch {batch} is partial"
        );
        assert!(msgs.last().unwrap().2, "batch {batch} lacks its commit");
        assert!(
            msgs.windows(2).all(|w| w[1].0 == w[0].0 + 1),
            "batch {batch} not contiguous"
        );
    }
    // Per aggregate: in order, no gaps (each append is 2 events).
    let mut per: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in &all {
        per.entry(e.stream_id.id().to_owned())
            .or_default()
            .push(n_of(e));
    }
    for (agg, ns) in per {
        assert_eq!(ns, (0..ns.len() as u64).collect::<Vec<_>>(), "{agg}");
    }
    eprintln!(
        "kill -9: {} appends acknowledged, {} events, {} with batch headers",
        acked.len(),
        all.len(),
        with_batch_headers
    );
}

#[tokio::test]
async fn an_idle_append_goes_out_at_once_in_a_batch_of_one() {
    let server = NatsServer::start();
    // Even with the longest linger allowed, an idle store does not wait.
    let store = server
        .store_with(StoreConfig {
            group_commit: GroupCommitConfig {
                linger: Duration::from_millis(2),
                ..GroupCommitConfig::default()
            },
            ..StoreConfig::default()
        })
        .await;
    let id = StreamId::new("idle", "one").unwrap();
    let mut version = 0;
    for n in 0..20 {
        let r = store
            .append(&id, ExpectedVersion::from_version(version), vec![ev(0, n)])
            .await
            .unwrap();
        version = r.version;
    }
    let stats = store.group_commit_stats();
    assert!(stats.enabled);
    assert_eq!(stats.batches, 20, "{stats:?}");
    assert_eq!(
        stats.batch_sizes[0].batches, 20,
        "every batch held one append: {stats:?}"
    );
    assert_eq!(stats.max_batch_events, 1);
    assert_eq!(
        stats.lingered_batches, 0,
        "an idle append waited: {stats:?}"
    );
    assert_eq!(stats.fsyncs_saved, 0);
}
