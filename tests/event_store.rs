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
    chain.sort_unstable();
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
    let client = server.client().await;
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

    // A message breaking the contract is reported with its position, not
    // skipped.
    let ack = js
        .publish("events.account.ext-2", "{}".into())
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
        matches!(&err, Error::InvalidStoredEvent { position, reason, .. }
            if *position == ack.sequence && reason.contains("\"specversion\"")),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains(&format!("event at position {} (", ack.sequence)),
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
                tokio::time::sleep(Duration::from_millis(200)).await;
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
    // A replicated stream checks ids before expectations (a single server
    // the other way round): a reused id is refused either way.
    let first = store
        .append(&id, ExpectedVersion::Any, vec![with_id(ev(3), "r3-id")])
        .await
        .unwrap();
    let other = StreamId::new("account", "r3-other").unwrap();
    for expected in [ExpectedVersion::NoStream, ExpectedVersion::Any] {
        let err = store
            .append(&other, expected, vec![with_id(ev(4), "r3-id")])
            .await
            .unwrap_err();
        assert_id_reused(err, "r3-id", "account/r3", first.positions[0]);
    }
    let retry = store
        .append(
            &id,
            ExpectedVersion::Exact(r.version),
            vec![with_id(ev(3), "r3-id")],
        )
        .await
        .unwrap();
    assert!(retry.deduplicated);
    assert_eq!(store.stream_state().await.unwrap().messages, 3);
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
            Err(Error::Timeout(_) | Error::Connect { .. })
                if started.elapsed() < Duration::from_secs(10) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
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

fn with_id(e: NewEvent, id: &str) -> NewEvent {
    e.with_id(EventId::parse(id).unwrap())
}

fn assert_id_reused(err: Error, id: &str, existing_stream: &str, existing_position: u64) {
    match err {
        Error::IdReused {
            id: got,
            existing_stream: Some(s),
            existing_position: Some(p),
            ..
        } => {
            assert_eq!(got, id);
            assert_eq!(s, existing_stream);
            assert_eq!(p, existing_position);
        }
        other => panic!("expected IdReused for {id}, got {other:?}"),
    }
}

/// Finding 4: an id used on one aggregate and then on another was answered
/// "deduplicated" with the first aggregate's position, and the second
/// aggregate got nothing.
#[tokio::test]
async fn an_event_id_reused_on_another_aggregate_is_refused_not_deduplicated() {
    let server = NatsServer::start();
    let store = server.store().await;
    let acc10 = StreamId::new("account", "acc-10").unwrap();
    let acc11 = StreamId::new("account", "acc-11").unwrap();
    let first = store
        .append(
            &acc10,
            ExpectedVersion::Any,
            vec![with_id(ev(1), "same-id-1")],
        )
        .await
        .unwrap();
    let before = store.stream_state().await.unwrap();

    // Other data, another aggregate; with and without an expectation.
    for expected in [ExpectedVersion::Any, ExpectedVersion::NoStream] {
        let err = store
            .append(&acc11, expected, vec![with_id(ev(2), "same-id-1")])
            .await
            .unwrap_err();
        assert!(err.is_id_reused(), "{err}");
        assert_id_reused(err, "same-id-1", "account/acc-10", first.positions[0]);
    }
    // The same data on another aggregate is still another event.
    let err = store
        .append(
            &acc11,
            ExpectedVersion::Any,
            vec![with_id(ev(1), "same-id-1")],
        )
        .await
        .unwrap_err();
    assert_id_reused(err, "same-id-1", "account/acc-10", first.positions[0]);
    // Same aggregate, same id, other content.
    let err = store
        .append(
            &acc10,
            ExpectedVersion::Any,
            vec![with_id(ev(9), "same-id-1")],
        )
        .await
        .unwrap_err();
    assert_id_reused(err, "same-id-1", "account/acc-10", first.positions[0]);
    let other_type = NewEvent::new("test.other.v1", r#"{"n":1}"#);
    let err = store
        .append(
            &acc10,
            ExpectedVersion::Any,
            vec![with_id(other_type, "same-id-1")],
        )
        .await
        .unwrap_err();
    assert!(err.is_id_reused(), "{err}");

    assert!(read_all_of(&store, &acc11).await.is_empty());
    assert_eq!(
        store.stream_state().await.unwrap(),
        before,
        "nothing written"
    );
    // The true retry is still a duplicate.
    let retry = store
        .append(
            &acc10,
            ExpectedVersion::Any,
            vec![with_id(ev(1), "same-id-1")],
        )
        .await
        .unwrap();
    assert!(retry.deduplicated);
    assert_eq!(retry.positions, first.positions);
}

/// Finding 4, batches: an atomic batch holding a reused id failed with a
/// server error (HTTP 503); it is the same typed refusal, and a true retry
/// of a batch is still recognised.
#[tokio::test]
async fn a_batch_with_a_reused_id_is_refused_with_the_id_and_where_it_is() {
    let server = NatsServer::start();
    let store = server.store().await;
    let t1 = StreamId::new("thing", "t-1").unwrap();
    let t2 = StreamId::new("thing", "t-2").unwrap();
    let a = store
        .append(
            &t1,
            ExpectedVersion::NoStream,
            vec![with_id(ev(1), "b-1"), with_id(ev(2), "b-2")],
        )
        .await
        .unwrap();
    let before = store.stream_state().await.unwrap();

    // Reused from another aggregate, with and without an expectation.
    for expected in [ExpectedVersion::NoStream, ExpectedVersion::Any] {
        let err = store
            .append(
                &t2,
                expected,
                vec![with_id(ev(3), "fresh-1"), with_id(ev(4), "b-2")],
            )
            .await
            .unwrap_err();
        assert_id_reused(err, "b-2", "thing/t-1", a.positions[1]);
    }
    // Reused on the same aggregate in another append.
    let err = store
        .append(
            &t1,
            ExpectedVersion::Any,
            vec![with_id(ev(2), "b-2"), with_id(ev(5), "fresh-2")],
        )
        .await
        .unwrap_err();
    assert_id_reused(err, "b-2", "thing/t-1", a.positions[1]);
    // Same ids, changed data.
    let err = store
        .append(
            &t1,
            ExpectedVersion::NoStream,
            vec![with_id(ev(1), "b-1"), with_id(ev(7), "b-2")],
        )
        .await
        .unwrap_err();
    assert!(err.is_id_reused(), "{err}");
    // Twice in one append: refused before the server sees it.
    let err = store
        .append(
            &t2,
            ExpectedVersion::Any,
            vec![with_id(ev(1), "twin"), with_id(ev(2), "twin")],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::DuplicateEventId(ref id) if id == "twin"),
        "{err:?}"
    );
    assert!(err.is_invalid_input());

    assert!(read_all_of(&store, &t2).await.is_empty());
    assert_eq!(
        store.stream_state().await.unwrap(),
        before,
        "nothing written"
    );
    for expected in [ExpectedVersion::NoStream, ExpectedVersion::Any] {
        let retry = store
            .append(
                &t1,
                expected,
                vec![with_id(ev(1), "b-1"), with_id(ev(2), "b-2")],
            )
            .await
            .unwrap();
        assert!(retry.deduplicated);
        assert_eq!(retry.positions, a.positions);
    }
}

/// Group commit: one append with a reused id among many concurrent ones
/// fails alone; the others land.
#[tokio::test]
async fn a_reused_id_in_a_group_commit_fails_only_its_own_append() {
    let server = NatsServer::start();
    let store = server.store().await;
    let owner = StreamId::new("thing", "owner").unwrap();
    let taken = store
        .append(&owner, ExpectedVersion::Any, vec![with_id(ev(0), "taken")])
        .await
        .unwrap();
    let appends = (0..64).map(|i| {
        let store = store.clone();
        async move {
            let id = StreamId::new("thing", format!("g-{i}")).unwrap();
            let event = if i == 17 {
                with_id(ev(i), "taken")
            } else {
                ev(i)
            };
            (
                i,
                store
                    .append(&id, ExpectedVersion::NoStream, vec![event])
                    .await,
            )
        }
    });
    for (i, r) in futures::future::join_all(appends).await {
        if i == 17 {
            assert_id_reused(r.unwrap_err(), "taken", "thing/owner", taken.positions[0]);
        } else {
            assert!(!r.unwrap().deduplicated);
        }
    }
    assert_eq!(store.stream_state().await.unwrap().messages, 64);
}

mod id_properties {
    //! Random sequences of appends with explicit ids on a few aggregates,
    //! against one shared real server: every `Ok` is readable on its
    //! aggregate, every refusal leaves the log unchanged, and an id that
    //! names another event is never `Ok`.

    use std::collections::HashMap;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use proptest::prelude::*;

    use super::*;

    struct Shared {
        runtime: tokio::runtime::Runtime,
        store: EventStore,
        _server: NatsServer,
    }

    fn shared() -> &'static Shared {
        static SHARED: OnceLock<Shared> = OnceLock::new();
        SHARED.get_or_init(|| {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let server = NatsServer::start();
            let store = runtime.block_on(server.store());
            Shared {
                runtime,
                store,
                _server: server,
            }
        })
    }

    #[derive(Debug, Clone, Copy)]
    enum Expect {
        Any,
        Current,
        Stale,
    }

    #[derive(Debug, Clone)]
    struct Op {
        aggregate: usize,
        /// (id from a small pool, data variant)
        events: Vec<(usize, u8)>,
        expect: Expect,
    }

    fn op() -> impl Strategy<Value = Op> {
        (
            0..3usize,
            prop::collection::vec((0..6usize, 0..2u8), 1..4),
            prop_oneof![
                Just(Expect::Any),
                Just(Expect::Current),
                Just(Expect::Stale)
            ],
        )
            .prop_map(|(aggregate, events, expect)| Op {
                aggregate,
                events,
                expect,
            })
    }

    /// What the log holds for an id: aggregate, data variant, position.
    type Model = HashMap<usize, (usize, u8, u64)>;

    async fn run_case(case: usize, ops: &[Op]) -> Result<(), TestCaseError> {
        let store = &shared().store;
        let aggregates: Vec<StreamId> = (0..3)
            .map(|a| StreamId::new(format!("pt{case}"), format!("a-{a}")).unwrap())
            .collect();
        let event = |id: usize, data: u8| {
            NewEvent::new("test.prop.v1", format!(r#"{{"d":{data}}}"#))
                .with_id(EventId::parse(&format!("c{case}-id-{id}")).unwrap())
        };
        let mut model = Model::new();
        for op in ops {
            let stream = &aggregates[op.aggregate];
            let version = store.last_version(stream).await.unwrap();
            let expected = match op.expect {
                Expect::Any => ExpectedVersion::Any,
                Expect::Current => ExpectedVersion::from_version(version),
                Expect::Stale => ExpectedVersion::Exact(version + 1_000_000),
            };
            let twice = {
                let mut seen = std::collections::HashSet::new();
                op.events.iter().any(|(id, _)| !seen.insert(*id))
            };
            let known: Vec<Option<&(usize, u8, u64)>> =
                op.events.iter().map(|(id, _)| model.get(id)).collect();
            let same = |i: usize| {
                known[i].is_some_and(|(a, d, _)| *a == op.aggregate && *d == op.events[i].1)
            };
            let reuses_other = (0..op.events.len()).any(|i| known[i].is_some() && !same(i));
            // A retry is recognised when its events are stored unchanged,
            // in its order, on its aggregate.
            let all_same = (0..op.events.len()).all(same)
                && known
                    .windows(2)
                    .all(|w| matches!(w, [Some(a), Some(b)] if a.2 < b.2));
            let all_fresh = known.iter().all(Option::is_none);

            let before = store.stream_state().await.unwrap();
            let events: Vec<NewEvent> = op.events.iter().map(|&(id, d)| event(id, d)).collect();
            let result = store.append(stream, expected, events.clone()).await;
            match &result {
                Ok(r) => {
                    prop_assert!(!twice && !reuses_other, "{op:?} -> Ok {r:?}");
                    prop_assert_eq!(r.positions.len(), events.len());
                    let stored = read_all_of(store, stream).await;
                    for (e, p) in events.iter().zip(&r.positions) {
                        let s = stored.iter().find(|s| s.position == *p);
                        prop_assert!(s.is_some(), "{op:?}: position {p} not on {stream}");
                        let s = s.unwrap();
                        prop_assert_eq!(&s.envelope.id, &e.id);
                        prop_assert_eq!(&s.envelope.data, &e.data);
                    }
                    if r.deduplicated {
                        prop_assert!(all_same, "{op:?}: dedup of events not stored");
                        prop_assert_eq!(
                            store.stream_state().await.unwrap().messages,
                            before.messages
                        );
                    } else {
                        prop_assert!(all_fresh, "{op:?}: wrote again {r:?}");
                        for (&(id, d), p) in op.events.iter().zip(&r.positions) {
                            model.insert(id, (op.aggregate, d, *p));
                        }
                    }
                }
                Err(e) => {
                    prop_assert_eq!(
                        store.stream_state().await.unwrap().messages,
                        before.messages,
                        "{:?}: refusal {} wrote something",
                        op,
                        e
                    );
                    prop_assert!(
                        e.is_conflict()
                            || e.is_id_reused()
                            || matches!(e, Error::DuplicateEventId(_)),
                        "{op:?}: unexpected {e:?}"
                    );
                    if twice {
                        prop_assert!(matches!(e, Error::DuplicateEventId(_)), "{e:?}");
                    } else if all_fresh && !matches!(op.expect, Expect::Stale) {
                        prop_assert!(false, "{op:?}: fresh append refused: {e}");
                    } else if all_same && !matches!(op.expect, Expect::Stale) {
                        prop_assert!(false, "{op:?}: true retry refused: {e}");
                    }
                }
            }
        }
        Ok(())
    }

    static CASE: AtomicUsize = AtomicUsize::new(0);

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 64, ..ProptestConfig::default() })]
        #[test]
        fn appends_with_explicit_ids_never_lie(ops in prop::collection::vec(op(), 1..12)) {
            let case = CASE.fetch_add(1, Ordering::Relaxed);
            shared().runtime.block_on(run_case(case, &ops))?;
        }
    }
}
