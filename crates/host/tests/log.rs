//! The log over HTTP (`/v1/events` pages and the `/v1/events/live` SSE
//! feed) against a real nats-server, through the host's whole router.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures::StreamExt;
use serde_json::Value;
use sluice_events::{EventStore, ExpectedVersion, NewEvent, StreamId};
use sluice_host::App;
use sluice_host::http::{HttpOptions, app_router};
use tower::ServiceExt;

async fn router(store: &EventStore) -> Router {
    let mut opts = HttpOptions::with_token("test-token-0123456789abcdef");
    opts.rate_per_sec = 100_000;
    opts.burst = 100_000;
    app_router(
        &App::new("t"),
        store.clone(),
        None,
        Vec::new(),
        1,
        Duration::from_secs(60),
        &opts,
    )
    .await
    .unwrap()
}

async fn append(store: &EventStore, category: &str, id: &str, ty: &str, n: u64) -> u64 {
    let sid = StreamId::new(category, id).unwrap();
    let r = store
        .append(
            &sid,
            ExpectedVersion::Any,
            vec![NewEvent::new(ty, format!(r#"{{"n":{n}}}"#))],
        )
        .await
        .unwrap();
    r.positions[0]
}

async fn get(app: &Router, uri: &str) -> (StatusCode, Value) {
    let req = Request::builder().uri(uri).body(Body::empty()).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Pages of the whole log, then of one category and one type: every event
/// once, in order, with a cursor that continues where the page ended.
#[tokio::test]
async fn pages_cover_the_log_in_order_with_filters() {
    let nats = sluice_testkit::NatsServer::start();
    let store = nats.store().await;
    let app = router(&store).await;
    let mut all = Vec::new();
    for n in 0..250u64 {
        let (cat, ty) = if n % 5 == 0 {
            ("beta", "t.beta.v1")
        } else {
            ("alpha", if n % 2 == 0 { "t.even.v1" } else { "t.odd.v1" })
        };
        all.push((
            append(&store, cat, &format!("a-{}", n % 7), ty, n).await,
            cat,
            ty,
        ));
    }
    let follow = |filter: &'static str, limit: usize| {
        let app = app.clone();
        async move {
            let (mut after, mut got) = (0u64, Vec::new());
            loop {
                let (s, v) = get(
                    &app,
                    &format!("/v1/events?after={after}&limit={limit}{filter}"),
                )
                .await;
                assert_eq!(s, StatusCode::OK, "{v}");
                for e in v["events"].as_array().unwrap() {
                    got.push((
                        e["position"].as_u64().unwrap(),
                        e["type"].as_str().unwrap().to_owned(),
                    ));
                    assert_eq!(e["specversion"], "1.0");
                    assert!(e["stream"].as_str().unwrap().contains('/'), "{e}");
                    assert!(e["data"]["n"].is_u64(), "{e}");
                }
                after = v["next"].as_u64().unwrap();
                if !v["more"].as_bool().unwrap() {
                    return got;
                }
            }
        }
    };
    let positions = |f: &dyn Fn(&&(u64, &str, &str)) -> bool| -> Vec<u64> {
        all.iter().filter(f).map(|e| e.0).collect()
    };
    let got: Vec<u64> = follow("", 100).await.into_iter().map(|e| e.0).collect();
    assert_eq!(got, positions(&|_| true));
    let got: Vec<u64> = follow("&category=beta", 7)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(got, positions(&|e| e.1 == "beta"));
    let got = follow("&category=alpha&type=t.odd.v1", 9).await;
    assert!(got.iter().all(|e| e.1 == "t.odd.v1"));
    let got: Vec<u64> = got.into_iter().map(|e| e.0).collect();
    assert_eq!(got, positions(&|e| e.2 == "t.odd.v1"));
    // Past the head: an empty page, the cursor where it was.
    let last = all.last().unwrap().0;
    let (s, v) = get(&app, &format!("/v1/events?after={last}")).await;
    assert_eq!(
        (s, v["events"].as_array().unwrap().len()),
        (StatusCode::OK, 0)
    );
    assert_eq!(v["next"], last);
    for bad in [
        "limit=0",
        "limit=1001",
        "after=-1",
        "category=a.b",
        "bogus=1",
    ] {
        let (s, v) = get(&app, &format!("/v1/events?{bad}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert_eq!(v["status"], 400, "{bad}: a problem document: {v}");
    }
}

/// Reads SSE frames from a live response until `n` events arrived.
async fn read_events(body: Body, n: usize) -> Vec<(u64, u64)> {
    let mut stream = body.into_data_stream();
    let (mut text, mut got) = (String::new(), Vec::new());
    while got.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("an event within 30 s")
            .expect("the feed stays open")
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = text.find("\n\n") {
            let frame: String = text.drain(..end + 2).collect();
            let (mut id, mut data) = (None, None);
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = v.parse::<u64>().ok();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = serde_json::from_str::<Value>(v).ok();
                }
            }
            if let (Some(id), Some(d)) = (id, data) {
                assert_eq!(d["position"], id);
                got.push((id, d["data"]["n"].as_u64().unwrap()));
            }
        }
    }
    got
}

async fn open_live(app: &Router, uri: &str, last_event_id: Option<u64>) -> Body {
    let mut req = Request::builder().uri(uri);
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id.to_string());
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    resp.into_body()
}

/// A live client started before 1,000 appends receives all of them in
/// order; one that drops after 400 and reconnects with Last-Event-ID
/// receives the rest with no gap and no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_feed_delivers_everything_in_order_and_resumes_without_gaps() {
    let nats = sluice_testkit::NatsServer::start();
    let store = nats.store().await;
    let app = router(&store).await;
    let start = append(&store, "feed", "f-0", "t.tick.v1", 0).await;
    let whole = open_live(
        &app,
        &format!("/v1/events/live?category=feed&after={start}"),
        None,
    )
    .await;
    let partial = open_live(
        &app,
        &format!("/v1/events/live?category=feed&after={start}"),
        None,
    )
    .await;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut positions = Vec::new();
            for n in 1..=1000u64 {
                positions
                    .push(append(&store, "feed", &format!("f-{}", n % 13), "t.tick.v1", n).await);
                // Another category, never in the feed.
                if n % 100 == 0 {
                    append(&store, "other", "o-1", "t.tick.v1", n).await;
                }
            }
            positions
        })
    };
    let first = read_events(partial, 400).await;
    let resume_from = first.last().unwrap().0;
    let rest = read_events(
        open_live(&app, "/v1/events/live?category=feed", Some(resume_from)).await,
        600,
    )
    .await;
    let all = read_events(whole, 1000).await;
    let positions = writer.await.unwrap();
    let ns: Vec<u64> = all.iter().map(|e| e.1).collect();
    assert_eq!(ns, (1..=1000).collect::<Vec<_>>(), "every append, in order");
    assert_eq!(all.iter().map(|e| e.0).collect::<Vec<_>>(), positions);
    let resumed: Vec<u64> = first.iter().chain(&rest).map(|e| e.1).collect();
    assert_eq!(
        resumed,
        (1..=1000).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
}

/// Hundreds of live clients at once each get every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_live_clients_each_get_every_event() {
    const CLIENTS: usize = 300;
    const EVENTS: u64 = 40;
    let nats = sluice_testkit::NatsServer::start();
    let store = nats.store().await;
    let app = router(&store).await;
    let start = append(&store, "fan", "f-0", "t.fan.v1", 0).await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let body = open_live(
            &app,
            &format!("/v1/events/live?category=fan&after={start}"),
            None,
        )
        .await;
        clients.push(tokio::spawn(read_events(body, EVENTS as usize)));
    }
    for n in 1..=EVENTS {
        append(&store, "fan", "f-1", "t.fan.v1", n).await;
    }
    let mut distinct = BTreeSet::new();
    for c in clients {
        let got: Vec<u64> = c.await.unwrap().into_iter().map(|e| e.1).collect();
        assert_eq!(got, (1..=EVENTS).collect::<Vec<_>>());
        distinct.insert(got);
    }
    assert_eq!(distinct.len(), 1);
}
