//! The event store against a real nats-server 2.15.1.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use sluice_events::{
    Error, EventId, EventStore, ExpectedVersion, NewEvent, RecordedEvent, StoreConfig, StreamId,
};
use sluice_testkit::{NatsCluster, NatsServer};

fn ev(n: u64) -> NewEvent {
    NewEvent::new("test.counted.v1", format!(r#"{{"n":{n}}}"#))
}

async fn read_all_of(store: &EventStore, id: &StreamId) -> Vec<RecordedEvent> {
    store
        .read(id, 1)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

#[tokio::test]
async fn append_then_read_back_in_order() {
    let server = NatsServer::start();
    let store = server.store().await;
    let id = StreamId::new("account", "acc-1").unwrap();
    let r1 = store
        .append(&id, ExpectedVersion::NoStream, vec![ev(1)])
        .await
        .unwrap();
    let r2 = store
        .append(&id, ExpectedVersion::Exact(r1.version), vec![ev(2), ev(3)])
        .await
        .unwrap();
    assert_eq!(r2.positions.len(), 2);
    assert_eq!(r2.version, *r2.positions.last().unwrap());
    let events = read_all_of(&store, &id).await;
    let ns: Vec<String> = events
        .iter()
        .map(|e| String::from_utf8(e.envelope.data.to_vec()).unwrap())
        .collect();
    assert_eq!(ns, vec![r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#]);
    assert_eq!(events[0].envelope.subject.as_deref(), Some("acc-1"));
    assert_eq!(store.last_version(&id).await.unwrap(), r2.version);
    // read from a later position only returns the tail
    let tail: Vec<RecordedEvent> = store
        .read(&id, r2.positions[0])
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(tail.len(), 2);
    let all: Vec<RecordedEvent> = store
        .read_all(1)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
}

#[tokio::test]
async fn reading_a_missing_aggregate_is_empty_at_once() {
    let server = NatsServer::start();
    let store = server.store().await;
    let id = StreamId::new("account", "nobody").unwrap();
    let started = Instant::now();
    assert!(read_all_of(&store, &id).await.is_empty());
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(store.last_version(&id).await.unwrap(), 0);
}

#[tokio::test]
async fn sixteen_concurrent_writers_never_lose_an_update() {
    let server = NatsServer::start();
    let store = server.store().await;
    let id = StreamId::new("counter", "hot").unwrap();
    let per_writer = 25;
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let store = store.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut conflicts = 0u64;
            while acked.len() < per_writer {
                let v = store.last_version(&id).await.unwrap();
                match store
                    .append(&id, ExpectedVersion::from_version(v), vec![ev(w)])
                    .await
                {
                    Ok(r) => acked.push((v, r.version)),
                    Err(Error::Conflict {
                        expected, actual, ..
                    }) => {
                        assert_eq!(expected, v);
                        assert_ne!(actual, expected);
                        conflicts += 1;
                    }
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
            (acked, conflicts)
        }));
    }
    let mut chain = Vec::new();
    let mut conflicts = 0;
    for t in tasks {
        let (acked, c) = t.await.unwrap();
        chain.extend(acked);
        conflicts += c;
    }
    assert_eq!(chain.len(), 16 * per_writer);
    assert!(conflicts > 0, "16 writers on one aggregate should conflict");
    // Every acknowledged append built on the previous one: one chain, no gaps.
    chain.sort();
    let mut prev = 0;
    for (expected, version) in &chain {
        assert_eq!(*expected, prev, "lost update: {chain:?}");
        prev = *version;
    }
    let events = read_all_of(&store, &id).await;
    assert_eq!(events.len(), chain.len());
    let positions: Vec<u64> = events.iter().map(|e| e.position).collect();
    let acked: Vec<u64> = chain.iter().map(|(_, v)| *v).collect();
    assert_eq!(positions, acked);
}

#[tokio::test]
async fn retried_appends_with_the_same_ids_never_duplicate() {
    let server = NatsServer::start();
    let store = server.store().await;
    let id = StreamId::new("order", "o-1").unwrap();

    // A single event with an exact expectation, "ack lost", retried as is.
    let first = ev(1);
    let a = store
        .append(&id, ExpectedVersion::NoStream, vec![first.clone()])
        .await
        .unwrap();
    let retry = store
        .append(&id, ExpectedVersion::NoStream, vec![first.clone()])
        .await
        .unwrap();
    assert_eq!(retry.positions, a.positions);
    assert!(retry.deduplicated);

    // A batch with an exact expectation.
    let batch = vec![ev(2), ev(3), ev(4)];
    let b = store
        .append(&id, ExpectedVersion::Exact(a.version), batch.clone())
        .await
        .unwrap();
    let retry = store
        .append(&id, ExpectedVersion::Exact(a.version), batch.clone())
        .await
        .unwrap();
    assert_eq!(retry.positions, b.positions);
    assert!(retry.deduplicated);

    // No expectation: single and batch.
    let single = ev(5);
    let c = store
        .append(&id, ExpectedVersion::Any, vec![single.clone()])
        .await
        .unwrap();
    let retry = store
        .append(&id, ExpectedVersion::Any, vec![single.clone()])
        .await
        .unwrap();
    assert_eq!(retry.positions, c.positions);
    let any_batch = vec![ev(6), ev(7)];
    let d = store
        .append(&id, ExpectedVersion::Any, any_batch.clone())
        .await
        .unwrap();
    let retry = store
        .append(&id, ExpectedVersion::Any, any_batch.clone())
        .await
        .unwrap();
    assert_eq!(retry.positions, d.positions);

    let events = read_all_of(&store, &id).await;
    let ids: Vec<String> = events.iter().map(|e| e.envelope.id.to_string()).collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), 7, "{ids:?}");
    assert_eq!(unique.len(), 7);
}

#[tokio::test]
async fn a_multi_event_append_is_all_or_nothing_on_conflict() {
    let server = NatsServer::start();
    let store = server.store().await;
    let id = StreamId::new("order", "o-2").unwrap();
    let r = store
        .append(&id, ExpectedVersion::NoStream, vec![ev(1)])
        .await
        .unwrap();
    let err = store
        .append(&id, ExpectedVersion::NoStream, vec![ev(2), ev(3), ev(4)])
        .await
        .unwrap_err();
    match err {
        Error::Conflict {
            expected, actual, ..
        } => {
            assert_eq!(expected, 0);
            assert_eq!(actual, r.version);
        }
        other => panic!("expected a conflict, got {other}"),
    }
    assert_eq!(read_all_of(&store, &id).await.len(), 1);
    assert_eq!(store.stream_state().await.unwrap().messages, 1);
}

#[tokio::test]
async fn bad_input_is_refused_before_anything_is_written() {
    let server = NatsServer::start();
    let store = server
        .store_with(StoreConfig {
            max_payload: 1024,
            ..StoreConfig::default()
        })
        .await;
    for bad in [".", "a.b", "*", ">", "a b", "", &"x".repeat(129)] {
        let err = StreamId::new("account", bad).unwrap_err();
        assert!(matches!(err, Error::InvalidToken { .. }), "{bad:?}: {err}");
        let err = StreamId::new(bad, "ok").unwrap_err();
        assert!(matches!(err, Error::InvalidToken { .. }), "{bad:?}: {err}");
    }
    let id = StreamId::new("account", "acc-9").unwrap();
    type Check = fn(&Error) -> bool;
    let cases: Vec<(NewEvent, Check)> = vec![
        (NewEvent::new("t.v1", vec![b'1'; 2048]), |e| {
            matches!(
                e,
                Error::PayloadTooLarge {
                    size: 2048,
                    limit: 1024
                }
            )
        }),
        (NewEvent::new("t.v1", "{oops"), |e| {
            matches!(e, Error::InvalidJson(_))
        }),
        (NewEvent::new("", "{}"), |e| {
            matches!(e, Error::InvalidEventType(_))
        }),
        (NewEvent::new("t.v1", "{}").with_source(""), |e| {
            matches!(e, Error::MissingAttribute("source"))
        }),
        // A line break would end the header early: refused, never a panic.
        (
            NewEvent::new("t.v1", "{}").with_correlation_id("flow-1\r\nX-Evil: 1"),
            |e| {
                matches!(
                    e,
                    Error::InvalidAttribute {
                        name: "correlationid",
                        ..
                    }
                )
            },
        ),
    ];
    for (event, check) in cases {
        let err = store
            .append(&id, ExpectedVersion::Any, vec![event])
            .await
            .unwrap_err();
        assert!(check(&err), "unexpected error: {err}");
        assert!(err.is_invalid_input());
    }
    let err = store
        .append(&id, ExpectedVersion::Any, vec![])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::EmptyAppend));
    let many: Vec<NewEvent> = (0..1001).map(ev).collect();
    let err = store
        .append(&id, ExpectedVersion::Any, many)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TooManyEvents { count: 1001, .. }));
    assert_eq!(store.stream_state().await.unwrap().messages, 0);
}

#[tokio::test]
async fn events_from_any_nats_client_are_read_in_both_content_modes() {
    let server = NatsServer::start();
    let store = server.store().await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut h = async_nats::HeaderMap::new();
    h.insert("Content-Type", "application/cloudevents+json");
    js.publish_with_headers(
        "events.account.ext-1",
        h,
        br#"{"specversion":"1.0","id":"go-1","source":"go-svc","type":"ledger.account.opened.v1","data":{"owner":"ann","currency":"EUR"}}"#.as_slice().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let id = StreamId::new("account", "ext-1").unwrap();
    let events = read_all_of(&store, &id).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].envelope.id, EventId::parse("go-1").unwrap());
    assert_eq!(
        &events[0].envelope.data[..],
        br#"{"owner":"ann","currency":"EUR"}"#
    );

    // A message breaking the contract is reported, not skipped.
    js.publish("events.account.ext-2", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let id = StreamId::new("account", "ext-2").unwrap();
    let err = store
        .read(&id, 1)
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap_err();
    // Named by its position (the remedy: void it), with the decoder's reason.
    assert!(
        matches!(&err, Error::InvalidStoredEvent { reason, .. } if reason.contains("\"specversion\"")),
        "{err}"
    );
    assert!(err.stored_event_position().is_some(), "{err}");
}

#[tokio::test]
async fn kill_minus_nine_loses_no_acknowledged_append() {
    let mut server = NatsServer::start();
    let url = server.url();
    let store = server.store().await;
    let acked = Arc::new(std::sync::Mutex::new(Vec::<(String, u64, String)>::new()));
    let writers: Vec<_> = (0..32)
        .map(|w| {
            let store = store.clone();
            let acked = acked.clone();
            tokio::spawn(async move {
                let id = StreamId::new("k9", format!("w{w}")).unwrap();
                let mut n = 0u64;
                loop {
                    let event = ev(n);
                    let event_id = event.id.to_string();
                    match store.append(&id, ExpectedVersion::Any, vec![event]).await {
                        Ok(r) => {
                            acked
                                .lock()
                                .unwrap()
                                .push((id.id().to_owned(), r.version, event_id));
                            n += 1;
                            if n > 10_000 / 32 {
                                return;
                            }
                        }
                        // While the server is down appends fail after their retries.
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            })
        })
        .collect();
    // Let a few thousand land, then kill -9 mid-run and bring it back.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 3_000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.restart();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 10_000, "only {} acknowledged", acked.len());

    let store = EventStore::connect(&url, StoreConfig::default())
        .await
        .unwrap();
    let all: Vec<RecordedEvent> = store
        .read_all(1)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let stored: HashSet<(String, u64, String)> = all
        .iter()
        .map(|e| {
            (
                e.stream_id.id().to_owned(),
                e.position,
                e.envelope.id.to_string(),
            )
        })
        .collect();
    for a in &acked {
        assert!(
            stored.contains(a),
            "acknowledged event missing after kill -9: {a:?}"
        );
    }
    // In order per aggregate, and nothing stored twice.
    let ids: HashSet<String> = all.iter().map(|e| e.envelope.id.to_string()).collect();
    assert_eq!(ids.len(), all.len(), "an event was stored twice");
    for w in 0..32 {
        let id = StreamId::new("k9", format!("w{w}")).unwrap();
        let ns: Vec<u64> = read_all_of(&store, &id)
            .await
            .iter()
            .map(|e| {
                e.envelope.data_as::<serde_json::Value>().unwrap()["n"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        let expected: Vec<u64> = (0..ns.len() as u64).collect();
        assert_eq!(ns, expected, "aggregate w{w} out of order or with gaps");
    }
}

#[tokio::test]
async fn a_replicated_stream_on_a_three_node_cluster() {
    let cluster = NatsCluster::start();
    // Wait for the cluster to elect a meta leader.
    let mut store = None;
    for _ in 0..100 {
        match EventStore::connect(
            &cluster.url(),
            StoreConfig {
                replicas: 3,
                ..StoreConfig::default()
            },
        )
        .await
        {
            Ok(s) => {
                store = Some(s);
                break;
            }
            Err(e) => {
                eprintln!("cluster not ready: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await
            }
        }
    }
    let store = store.expect("cluster never became ready");
    let id = StreamId::new("account", "r3").unwrap();
    let r = store
        .append(&id, ExpectedVersion::NoStream, vec![ev(1), ev(2)])
        .await
        .unwrap();
    assert_eq!(r.positions.len(), 2);
    let state = store.stream_state().await.unwrap();
    assert_eq!(state.replicas, 3);
    assert_eq!(state.messages, 2);
}

#[tokio::test]
async fn an_old_nats_server_is_refused_with_the_versions() {
    let old = std::path::Path::new("/usr/sbin/nats-server");
    if !old.exists() {
        eprintln!("/usr/sbin/nats-server absent: nothing to refuse here");
        return;
    }
    // Refused before start when Sluice launches it...
    let dir = tempfile_dir();
    let mut config = sluice_events::EmbeddedConfig::new(&dir);
    config.bin = Some(old.to_path_buf());
    let err = sluice_events::EmbeddedServer::start(config).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::ServerTooOld { .. }), "{msg}");
    assert!(msg.contains("2.9") && msg.contains(">= 2.12.0"), "{msg}");

    // ...and on connect when someone else runs it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(old)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    let started = Instant::now();
    let result = loop {
        match EventStore::connect(&url, StoreConfig::default()).await {
            Err(Error::Timeout(_)) | Err(Error::Connect { .. })
                if started.elapsed() < Duration::from_secs(10) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => break other,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let err = result.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::ServerTooOld { .. }), "{msg}");
    assert!(msg.contains("2.9.") && msg.contains(">= 2.12.0"), "{msg}");
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-old-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn execute_reloads_and_retries_on_conflict_and_refuses_rejected_commands() {
    use sluice_events::{ExecuteError, execute, load};
    use sluice_testkit::counter::{Counter, CounterCommand, CounterRejection};

    let server = NatsServer::start();
    let store = server.store().await;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut attempts = 0;
                for _ in 0..10 {
                    let out = execute::<Counter>(&store, "c-1", &CounterCommand::Add(1), 100)
                        .await
                        .unwrap();
                    attempts += out.attempts;
                }
                attempts
            })
        })
        .collect();
    let mut attempts = 0;
    for t in tasks {
        attempts += t.await.unwrap();
    }
    let id = StreamId::new("counter", "c-1").unwrap();
    let (state, version) = load::<Counter>(&store, &id).await.unwrap();
    assert_eq!(state.value, 80, "a lost update");
    assert_eq!(version, store.last_version(&id).await.unwrap());
    assert!(attempts >= 80);

    execute::<Counter>(&store, "c-1", &CounterCommand::Close, 3)
        .await
        .unwrap();
    let err = execute::<Counter>(&store, "c-1", &CounterCommand::Add(1), 3)
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        ExecuteError::Rejected(CounterRejection::Closed)
    ));
    assert_eq!(read_all_of(&store, &id).await.len(), 81);
    let err = execute::<Counter>(&store, "bad.id", &CounterCommand::Add(1), 3)
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        ExecuteError::Store(Error::InvalidToken { .. })
    ));
}

/// `sluice up` killed with SIGKILL leaves its nats-server running; the next
/// start on the same directory must stop it instead of running a second
/// server on the same store, and the events written before are all there.
#[tokio::test]
async fn a_leftover_server_on_the_same_store_is_stopped_before_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let first =
        sluice_events::EmbeddedServer::start(sluice_events::EmbeddedConfig::new(dir.path()))
            .unwrap();
    let old_port = first.port();
    let id = StreamId::new("leftover", "a").unwrap();
    {
        let store = EventStore::connect(&first.url(), StoreConfig::default())
            .await
            .unwrap();
        store
            .append(&id, ExpectedVersion::NoStream, vec![ev(1), ev(2)])
            .await
            .unwrap();
    }
    // The parent dies without stopping its server.
    std::mem::forget(first);
    assert!(std::net::TcpStream::connect(("127.0.0.1", old_port)).is_ok());

    let second =
        sluice_events::EmbeddedServer::start(sluice_events::EmbeddedConfig::new(dir.path()))
            .unwrap();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", old_port)).is_err(),
        "the leftover server still listens"
    );
    let store = EventStore::connect(&second.url(), StoreConfig::default())
        .await
        .unwrap();
    let events = read_all_of(&store, &id).await;
    assert_eq!(events.len(), 2);
    let v = store
        .append(&id, ExpectedVersion::Exact(events[1].position), vec![ev(3)])
        .await
        .unwrap();
    assert_eq!(read_all_of(&store, &id).await.len(), 3);
    assert!(v.version > events[1].position);
}
