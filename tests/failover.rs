//! Failover: a 3-node loopback cluster with an R3 event stream; kill -9 of
//! the stream leader under sustained appends. Appends resume on the new
//! leader and every acknowledged append is in the log afterwards.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use sluice_events::{EventStore, ExpectedVersion, NewEvent, RecordedEvent, StoreConfig, StreamId};
use sluice_testkit::NatsCluster;

fn r3() -> StoreConfig {
    StoreConfig {
        replicas: 3,
        request_timeout: Duration::from_secs(2),
        ..StoreConfig::default()
    }
}

async fn connect(cluster: &NatsCluster) -> EventStore {
    for _ in 0..150 {
        if let Ok(s) = EventStore::connect(&cluster.url(), r3()).await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the cluster never became ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leader_loses_no_acknowledged_append() {
    let mut cluster = NatsCluster::start();
    let store = connect(&cluster).await;
    let started = Instant::now();
    // (event id, position, ms since start) of every acknowledged append.
    let acked = Arc::new(Mutex::new(Vec::<(String, u64, u128)>::new()));
    let run_for = Duration::from_secs(10);
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let store = store.clone();
            let acked = acked.clone();
            tokio::spawn(async move {
                let id = StreamId::new("failover", format!("w{w}")).unwrap();
                let mut n = 0u64;
                while started.elapsed() < run_for {
                    let event = NewEvent::new("test.counted.v1", format!(r#"{{"n":{n}}}"#));
                    let event_id = event.id.to_string();
                    match store.append(&id, ExpectedVersion::Any, vec![event]).await {
                        Ok(r) => {
                            acked.lock().unwrap().push((
                                event_id,
                                r.version,
                                started.elapsed().as_millis(),
                            ));
                            n += 1;
                        }
                        // During the election appends time out; the writer
                        // tries a new event (the old one may or may not be in).
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut stream = store.jetstream().get_stream("EVENTS").await.unwrap();
    let leader = stream
        .info()
        .await
        .unwrap()
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("a stream leader");
    let index: usize = leader.trim_start_matches('n').parse().unwrap();
    let killed_at = started.elapsed().as_millis();
    cluster.nodes[index].kill();
    eprintln!("killed stream leader {leader} at {killed_at} ms");
    for w in writers {
        w.await.unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    // The unavailability window: the longest pause between acknowledgements
    // from the kill on (acks already in flight at the kill may still land).
    let mut times: Vec<u128> = acked
        .iter()
        .map(|a| a.2)
        .filter(|t| *t >= killed_at)
        .collect();
    times.sort_unstable();
    assert!(
        !times.is_empty(),
        "no append succeeded after the leader died"
    );
    let mut window = times[0] - killed_at;
    for pair in times.windows(2) {
        window = window.max(pair[1] - pair[0]);
    }
    eprintln!(
        "{} acknowledged appends; longest pause after the kill {window} ms",
        acked.len()
    );
    assert!(window < 20_000, "unavailable for {window} ms");
    assert!(
        *times.last().unwrap() > killed_at + 2_000,
        "appends did not continue after the kill"
    );

    // Every acknowledged append is in the log, at its position, once. The
    // cluster may still be settling: retry the read for a while.
    let mut all: Vec<RecordedEvent> = Vec::new();
    for attempt in 0..30 {
        let fresh = connect(&cluster).await;
        let read = match fresh.read_all(1).await {
            Ok(events) => events.try_collect::<Vec<_>>().await,
            Err(e) => Err(e),
        };
        match read {
            Ok(events) => {
                all = events;
                break;
            }
            Err(e) if attempt < 29 => {
                eprintln!("read after failover failed ({e}); retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("cannot read the log after failover: {e}"),
        }
    }
    let stored: HashSet<(String, u64)> = all
        .iter()
        .map(|e| (e.envelope.id.to_string(), e.position))
        .collect();
    for (id, pos, _) in &acked {
        assert!(
            stored.contains(&(id.clone(), *pos)),
            "acknowledged append {id} at {pos} lost"
        );
    }
    let ids: HashSet<String> = all.iter().map(|e| e.envelope.id.to_string()).collect();
    assert_eq!(ids.len(), all.len(), "an event stored twice");
}
