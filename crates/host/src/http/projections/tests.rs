//! The router through `oneshot`, against a real nats-server and SQLite file.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use futures::FutureExt;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use sluice_events::{EventStore, ExpectedVersion, NewEvent, StreamId};
use sluice_testkit::NatsServer;
use sqlx::{AnyConnection, Row};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::{AppState, app};
use sluice_projections::{
    Database, Page, ProjectedEvent, Projection, ReadModel, Rejection, RunnerConfig, Tables,
};

/// Counts events per aggregate: the smallest projection with rows.
struct Counts;

impl Projection for Counts {
    fn name(&self) -> &'static str {
        "counts"
    }

    fn categories(&self) -> &'static [&'static str] {
        &["thing"]
    }

    fn tables(&self) -> &'static [&'static str] {
        &["counts"]
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        tables: &Tables,
        events: &[ProjectedEvent],
    ) -> Result<Vec<Rejection>, sqlx::Error> {
        let t = tables.name("counts");
        for e in events {
            sqlx::query(&format!(
                "INSERT INTO {t} (id, n) VALUES ($1, 1) \
                 ON CONFLICT (id) DO UPDATE SET n = {t}.n + 1"
            ))
            .bind(e.stream_id.id())
            .execute(&mut *conn)
            .await?;
        }
        Ok(Vec::new())
    }
}

impl ReadModel for Counts {
    fn name(&self) -> &'static str {
        "counts"
    }

    fn get<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<serde_json::Value>, sqlx::Error>> {
        async move {
            let row = sqlx::query("SELECT id, n FROM counts WHERE id = $1")
                .bind(key)
                .fetch_optional(conn)
                .await?;
            Ok(row.map(
                |r| serde_json::json!({ "id": r.get::<String, _>(0), "n": r.get::<i64, _>(1) }),
            ))
        }
        .boxed()
    }

    fn list<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        after: Option<&'a str>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Page, sqlx::Error>> {
        async move {
            let rows = sqlx::query("SELECT id, n FROM counts WHERE id > $1 ORDER BY id LIMIT $2")
                .bind(after.unwrap_or(""))
                .bind(i64::from(limit))
                .fetch_all(conn)
                .await?;
            let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            Ok(Page {
                rows: rows
                    .iter()
                    .map(|r| {
                        serde_json::json!({ "id": r.get::<String, _>(0), "n": r.get::<i64, _>(1) })
                    })
                    .collect(),
                next: (ids.len() == limit as usize)
                    .then(|| ids.last().cloned())
                    .flatten(),
            })
        }
        .boxed()
    }
}

struct Fixture {
    _nats: NatsServer,
    _dir: tempfile::TempDir,
    store: EventStore,
    db: Database,
    state: AppState,
    shutdown: CancellationToken,
}

async fn fixture() -> Fixture {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Database::connect(&format!("sqlite://{}", dir.path().join("r.db").display()))
        .await
        .expect("db");
    // Test-only table; real read models ship theirs as migrations.
    sqlx::query("CREATE TABLE counts (id TEXT PRIMARY KEY, n BIGINT NOT NULL)")
        .execute(db.pool())
        .await
        .expect("table");
    let shutdown = CancellationToken::new();
    let running = sluice_projections::spawn(
        Arc::new(Counts),
        db.clone(),
        store.clone(),
        RunnerConfig::default(),
        shutdown.clone(),
    )
    .await
    .expect("spawn");
    let state = AppState::builder(store.clone(), db.clone())
        .read_model(Arc::new(Counts), Some(running.projections[0].live.clone()))
        .wait_timeout(Duration::from_millis(300))
        .build();
    Fixture {
        _nats: nats,
        _dir: dir,
        store,
        db,
        state,
        shutdown,
    }
}

async fn append(store: &EventStore, id: &str) -> u64 {
    store
        .append(
            &StreamId::new("thing", id).expect("id"),
            ExpectedVersion::Any,
            vec![NewEvent::new(
                "test.thing.counted.v1",
                b"{\"x\":1}".to_vec(),
            )],
        )
        .await
        .expect("append")
        .version
}

async fn get(
    state: &AppState,
    uri: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
    let mut req = Request::get(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = app(state.clone())
        .oneshot(req.body(Body::empty()).expect("request"))
        .await
        .expect("response");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let json = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("json body")
    };
    (status, headers, json)
}

#[tokio::test]
async fn rows_by_key_and_page_with_etag_and_read_your_writes() {
    let f = fixture().await;
    for id in ["a", "b", "c"] {
        append(&f.store, id).await;
    }
    let pos = append(&f.store, "a").await;

    // Read-your-writes: waits for the projection, then answers.
    let (status, h, body) = get(
        &f.state,
        &format!("/v1/projections/counts/rows/a?min_position={pos}"),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["n"], 2);
    let etag = h[header::ETAG].to_str().expect("etag").to_owned();
    assert_eq!(etag, format!("\"{pos}\""));
    assert_eq!(h[header::CACHE_CONTROL], "no-cache");

    // Same checkpoint: 304.
    let (status, _, _) = get(
        &f.state,
        "/v1/projections/counts/rows/a",
        &[("if-none-match", etag.as_str())],
    )
    .await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);

    // Pages with a cursor.
    let (status, _, page) = get(&f.state, "/v1/projections/counts/rows?limit=2", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["rows"].as_array().map(Vec::len), Some(2));
    assert_eq!(page["next"], "b");
    let (_, _, page) = get(&f.state, "/v1/projections/counts/rows?limit=2&after=b", &[]).await;
    assert_eq!(page["rows"][0]["id"], "c");
    assert_eq!(page["next"], serde_json::Value::Null);

    // A position the projection cannot reach in time: 503 + Retry-After.
    let (status, h, body) = get(
        &f.state,
        "/v1/projections/counts/rows/a",
        &[("sluice-min-position", &(pos + 100).to_string())],
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h[header::RETRY_AFTER], "1");
    assert_eq!(h[header::CONTENT_TYPE], "application/problem+json");
    assert_eq!(body["status"], 503);

    // Status list.
    let (status, _, body) = get(&f.state, "/v1/projections", &[]).await;
    assert_eq!(status, StatusCode::OK);
    let p = &body["projections"][0];
    assert_eq!(p["name"], "counts");
    assert_eq!(p["checkpoint"], pos);
    assert_eq!(p["stream_last_position"], pos);
    assert_eq!(p["lag_events"], 0);
    assert_eq!(p["state"], "running");
    f.shutdown.cancel();
}

#[tokio::test]
async fn streams_and_errors_are_problem_details_without_internals() {
    let f = fixture().await;
    let pos = append(&f.store, "s1").await;

    let (status, _, body) = get(&f.state, "/v1/streams/thing/s1", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["events"][0]["position"], pos);
    assert_eq!(body["events"][0]["type"], "test.thing.counted.v1");
    assert_eq!(body["events"][0]["data"]["x"], 1);

    for (uri, want) in [
        ("/v1/streams/thing/nope", StatusCode::NOT_FOUND),
        ("/v1/streams/th*ng/x", StatusCode::BAD_REQUEST),
        ("/v1/projections/nope/rows/a", StatusCode::NOT_FOUND),
        ("/v1/projections/counts/rows/zzz", StatusCode::NOT_FOUND),
        (
            "/v1/projections/counts/rows?limit=0",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/projections/counts/rows?min_position=abc",
            StatusCode::BAD_REQUEST,
        ),
        ("/nowhere", StatusCode::NOT_FOUND),
    ] {
        let resp = app(f.state.clone())
            .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
            .await
            .expect("response");
        assert_eq!(resp.status(), want, "{uri}");
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/problem+json",
            "{uri}"
        );
    }

    // A broken read store (not a passing outage): 500, not "try again
    // shortly", and nothing about SQL in the body.
    f.shutdown.cancel();
    sqlx::query("DROP TABLE counts")
        .execute(f.db.pool())
        .await
        .expect("drop");
    let (status, h, body) = get(&f.state, "/v1/projections/counts/rows/s1", &[]).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["type"], "https://sluice.invalid/problems/internal");
    assert!(!h.contains_key(header::RETRY_AFTER));
    let text = body.to_string().to_lowercase();
    assert!(
        !text.contains("counts") || !text.contains("table"),
        "{text}"
    );
    assert!(!text.contains("sql"), "{text}");
}

#[tokio::test]
async fn without_min_position_answers_may_be_stale_but_never_go_backwards() {
    let f = fixture().await;
    let writer = {
        let store = f.store.clone();
        tokio::spawn(async move {
            let mut last = 0;
            for i in 0..200 {
                last = append(&store, &format!("w{}", i % 7)).await;
            }
            last
        })
    };
    let mut previous = 0u64;
    let mut seen = 0;
    while !writer.is_finished() || seen < 5 {
        let (status, h, body) = get(&f.state, "/v1/projections/counts/rows?limit=1000", &[]).await;
        assert_eq!(status, StatusCode::OK);
        let checkpoint = body["checkpoint"].as_u64().expect("checkpoint");
        let etag = h[header::ETAG].to_str().expect("etag").to_owned();
        assert_eq!(etag, format!("\"{checkpoint}\""));
        assert!(
            checkpoint >= previous,
            "went back from {previous} to {checkpoint}"
        );
        // Rows and ETag come from one snapshot: every event up to the
        // checkpoint is counted, none after it.
        let total: i64 = body["rows"]
            .as_array()
            .map(|rows| rows.iter().filter_map(|r| r["n"].as_i64()).sum())
            .unwrap_or(0);
        assert_eq!(total as u64, checkpoint);
        previous = checkpoint;
        seen += 1;
    }
    let last = writer.await.expect("writer");
    let (_, _, body) = get(
        &f.state,
        &format!("/v1/projections/counts/rows?limit=1000&min_position={last}"),
        &[],
    )
    .await;
    assert_eq!(body["checkpoint"], last);
    f.shutdown.cancel();
}

/// Sends `method uri` with an optional body and returns status, headers and
/// the body as JSON, asserting it is a complete RFC 9457 problem.
async fn problem_of(
    state: &AppState,
    method: &str,
    uri: &str,
) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
    let resp = app(state.clone())
        .oneshot(
            Request::builder()
                .method(method)
                .uri(uri)
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("response");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(
        headers[header::CONTENT_TYPE],
        "application/problem+json",
        "{method} {uri}: {}",
        String::from_utf8_lossy(&bytes)
    );
    let body: serde_json::Value = serde_json::from_slice(&bytes).expect("problem json");
    assert_eq!(body["status"], status.as_u16(), "{method} {uri}: {body}");
    for member in ["type", "title", "detail"] {
        assert!(
            body[member].as_str().is_some_and(|v| !v.is_empty()),
            "{method} {uri}: no {member} in {body}"
        );
    }
    (status, headers, body)
}

#[tokio::test]
async fn rejections_unknown_routes_and_wrong_methods_are_problems() {
    let f = fixture().await;
    let (status, h, body) = problem_of(&f.state, "POST", "/v1/projections").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let allow = h[header::ALLOW].to_str().expect("allow");
    assert!(allow.contains("GET"), "{allow}");
    assert_eq!(
        body["type"],
        "https://sluice.invalid/problems/method-not-allowed"
    );
    let (status, _, body) = problem_of(&f.state, "GET", "/v1/nowhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["type"], "https://sluice.invalid/problems/not-found");
    for uri in [
        "/v1/projections/counts/rows?limit=abc",
        "/v1/streams/thing/s1?from=-1",
        "/v1/projections/counts/rows/a?min_position=x",
    ] {
        let (status, _, body) = problem_of(&f.state, "GET", uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        assert_eq!(body["type"], "https://sluice.invalid/problems/bad-request");
    }
    f.shutdown.cancel();
}

/// An event written around Sluice's checks (a raw NATS publish without the
/// CloudEvents headers) is a server-side problem naming its position, not a
/// 503 that invites the client to retry forever.
#[tokio::test]
async fn a_stream_holding_an_undecodable_event_names_its_position() {
    let f = fixture().await;
    let first = append(&f.store, "bad-1").await;
    let ack = f
        .store
        .jetstream()
        .publish("events.thing.bad-1", "not an event".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let (status, h, body) = problem_of(&f.state, "GET", "/v1/streams/thing/bad-1").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(
        body["type"],
        "https://sluice.invalid/problems/invalid-stored-event"
    );
    assert_eq!(body["position"], ack.sequence, "{body}");
    assert_ne!(ack.sequence, first);
    let detail = body["detail"].as_str().expect("detail");
    assert!(
        detail.contains(&format!("position {}", ack.sequence)) && detail.contains("thing/bad-1"),
        "{detail}"
    );
    assert!(!h.contains_key(header::RETRY_AFTER));
    f.shutdown.cancel();
}
