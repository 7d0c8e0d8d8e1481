//! The HTTP API with the ledger's routes, through `oneshot`, against a
//! real nats-server (and a SQLite file where a read store is needed).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{StatusCode, header};
use serde_json::{Value, json};
use sluice_events::{EventStore, ExpectedVersion, NewEvent, StoreConfig, StreamId};
use sluice_host::App;
use sluice_host::http::{HttpOptions, IDEMPOTENT_REPLAYED, app_router, metrics_handle};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

fn ledger_app() -> App {
    App::new("sluice").module(sluice_ledger::module())
}

/// The router of the ledger app over `store`, as a fresh process would
/// build it.
async fn router_of(
    store: EventStore,
    db: Option<sluice_projections::Database>,
    live: Vec<(&'static str, sluice_projections::LiveStatus)>,
    opts: &HttpOptions,
) -> Router {
    app_router(
        &ledger_app(),
        store,
        db,
        live,
        1,
        sluice_ledger::DEFAULT_IDEMPOTENCY_RETENTION,
        opts,
    )
    .await
    .unwrap()
}

const TOKEN: &str = "test-token-0123456789abcdef";

async fn app(opts: HttpOptions) -> (Router, sluice_testkit::NatsServer) {
    let server = sluice_testkit::NatsServer::start();
    let router = app_on(&server, opts, StoreConfig::default()).await;
    (router, server)
}

/// The router over `server`, as a fresh process would build it.
async fn app_on(
    server: &sluice_testkit::NatsServer,
    opts: HttpOptions,
    config: StoreConfig,
) -> Router {
    let store = server.store_with(config).await;
    router_of(store, None, Vec::new(), &opts).await
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut req = axum::http::Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = match body {
        Some(b) => req
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, b.len())
            .body(Body::from(b)),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn opened() -> String {
    r#"{"expected_version":"none","events":[{"type":"ledger.account.opened.v1","data":{"owner":"ann","currency":"EUR"}}]}"#.to_owned()
}

#[tokio::test]
async fn appends_need_the_token_and_report_conflicts_and_bad_input_as_problems() {
    let mut opts = HttpOptions::with_token(TOKEN);
    opts.body_limit = 4096;
    let (app, _server) = app(opts).await;
    let url = "/v1/streams/account/acc-1";

    let (status, headers, body) = call(&app, "POST", url, None, Some(opened())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    let (status, _, _) = call(
        &app,
        "POST",
        url,
        Some("wrong-token-0123456789abcdef"),
        Some(opened()),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, _, body) = call(&app, "POST", url, Some(TOKEN), Some(opened())).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["positions"], json!([1]));

    let (status, _, body) = call(&app, "POST", url, Some(TOKEN), Some(opened())).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("expected version 0, actual 1"), "{body}");

    for (uri, body) in [
        ("/v1/streams/account/acc.1", opened()),
        (url, "{not json".to_owned()),
        (url, r#"{"events":[{"type":"t.v1"}]}"#.to_owned()),
        (
            url,
            r#"{"expected_version":-3,"events":[{"type":"t.v1","data":{}}]}"#.to_owned(),
        ),
        (
            url,
            r#"{"events":[{"type":"bad type","data":{}}]}"#.to_owned(),
        ),
        (url, r#"{"events":[]}"#.to_owned()),
    ] {
        let (status, headers, text) =
            call(&app, "POST", uri, Some(TOKEN), Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri} {body}: {text}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        assert!(!text.contains("sqlx") && !text.contains("nats:"), "{text}");
    }
    let huge = format!(
        r#"{{"events":[{{"type":"t.v1","data":"{}"}}]}}"#,
        "x".repeat(8192)
    );
    let (status, _, text) = call(&app, "POST", url, Some(TOKEN), Some(huge)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
}

#[tokio::test]
async fn the_public_append_checks_schemas_types_and_reserved_categories() {
    let (app, server) = app(HttpOptions::with_token(TOKEN)).await;
    let store = server.store().await;
    let post = |uri: &'static str, body: &'static str| {
        let app = app.clone();
        async move { call(&app, "POST", uri, Some(TOKEN), Some(body.to_owned())).await }
    };
    let (status, _, body) = post(
        "/v1/streams/account/s-1",
        r#"{"events":[{"type":"ledger.account.opened.v1","data":{"owner":"ann","currency":"EUR"}}]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let head = store.stream_state().await.unwrap().last_position;

    let (status, headers, body) = post(
        "/v1/streams/account/s-1",
        r#"{"events":[{"type":"ledger.account.deposited.v1","data":{"amount":-5}}]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["type"].as_str().unwrap().ends_with("/schema-violation"),
        "{v}"
    );
    assert_eq!(v["errors"][0]["pointer"], "/amount", "{v}");
    assert_eq!(v["errors"][0]["event"], 0, "{v}");
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("minimum"),
        "{v}"
    );

    let (status, _, body) = post(
        "/v1/streams/account/s-1",
        r#"{"events":[{"type":"x.v1","data":{}}]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["type"].as_str().unwrap().ends_with("/unknown-event-type"),
        "{v}"
    );
    assert!(
        v["known"]
            .as_array()
            .unwrap()
            .contains(&json!("ledger.account.deposited.v1"))
    );

    for uri in [
        "/v1/streams/cmd-account/acc-1",
        "/v1/streams/saga-transfer/t-1",
        "/v1/streams/sluice-void/1",
    ] {
        let (status, _, body) = post(
            uri,
            r#"{"events":[{"type":"sluice.saga.command.v1","data":{}}]}"#,
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{uri}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(
            v["type"].as_str().unwrap().ends_with("/reserved-category"),
            "{v}"
        );
    }
    assert_eq!(
        store.stream_state().await.unwrap().last_position,
        head,
        "nothing refused was written"
    );
    // Undeclared categories stay free-form.
    let (status, _, body) = post(
        "/v1/streams/thing/t-1",
        r#"{"events":[{"type":"anything.v1","data":[1,"two"]}]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

#[tokio::test]
async fn voiding_needs_the_token_is_idempotent_and_refuses_unknown_positions() {
    let (app, server) = app(HttpOptions::with_token(TOKEN)).await;
    let store = server.store().await;
    let (status, _, _) = call(
        &app,
        "POST",
        "/v1/streams/account/v-1",
        Some(TOKEN),
        Some(opened()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let reason = Some(r#"{"reason":"test"}"#.to_owned());
    let (status, _, _) = call(&app, "POST", "/v1/events/1/void", None, reason.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, first) = call(
        &app,
        "POST",
        "/v1/events/1/void",
        Some(TOKEN),
        reason.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let v: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(v["position"], 1);
    assert_eq!(v["stream"], "account/v-1");
    assert_eq!(v["type"], "ledger.account.opened.v1");
    let void_position = v["void_position"].as_u64().unwrap();
    let (status, _, again) = call(
        &app,
        "POST",
        "/v1/events/1/void",
        Some(TOKEN),
        Some(r#"{"reason":"other"}"#.to_owned()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again, first, "voiding twice answers the same");
    assert_eq!(
        store.stream_state().await.unwrap().last_position,
        void_position
    );
    let (status, _, body) = call(
        &app,
        "POST",
        "/v1/events/999/void",
        Some(TOKEN),
        reason.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let uri = format!("/v1/events/{void_position}/void");
    let (status, _, body) = call(&app, "POST", &uri, Some(TOKEN), reason.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _, body) = call(
        &app,
        "POST",
        "/v1/events/1/void",
        Some(TOKEN),
        Some(r#"{"reason":" "}"#.to_owned()),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // The voided account is gone for its loaders.
    let (account, version) = sluice_ledger::account_state(&store, "v-1").await.unwrap();
    assert!(!account.exists());
    assert_eq!(version, 1);
}

#[tokio::test]
async fn dead_letters_are_admin_only_and_rate_limits_answer_429() {
    let mut opts = HttpOptions::with_token(TOKEN);
    opts.rate_per_sec = 1;
    opts.burst = 3;
    let (app, _server) = app(opts).await;
    let (status, _, _) = call(&app, "GET", "/v1/dlq", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, body) = call(&app, "GET", "/v1/dlq", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, _) = call(&app, "GET", "/v1/dlq/999", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, headers, _) = call(&app, "GET", "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        headers[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
}

#[tokio::test]
async fn health_readiness_metrics_and_openapi() {
    let (app, _server) = app(HttpOptions::with_token(TOKEN)).await;
    let (status, _, _) = call(&app, "GET", "/healthz", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = call(&app, "GET", "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains(r#""nats":true"#), "{body}");
    let (status, _, _) = call(
        &app,
        "POST",
        "/v1/streams/account/m-1",
        Some(TOKEN),
        Some(opened()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _, body) = call(&app, "GET", "/metrics", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains(r#"sluice_appends_total{outcome="ok"} 1"#),
        "{body}"
    );
    assert!(body.contains("sluice_append_duration_seconds"), "{body}");
    assert!(
        body.contains("sluice_http_requests_total") && body.contains("sluice_stream_last_position"),
        "{body}"
    );
    // Prometheus conventions: every exported metric is a known one of its
    // kind, described, and durations are histograms, never summaries.
    let mut types = 0;
    for line in body.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut words = line["# TYPE ".len()..].split(' ');
        let (name, kind) = (words.next().unwrap(), words.next().unwrap());
        let known = sluice_host::http::METRICS
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} is exported but not in METRICS"));
        assert_eq!(kind, known.kind.as_str(), "{name}");
        assert!(
            body.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
        types += 1;
    }
    assert!(types >= 8, "only {types} metrics exported: {body}");
    assert!(!body.contains(" summary"), "{body}");
    assert!(
        body.contains("sluice_append_duration_seconds_bucket{le=\"0.005\"}"),
        "{body}"
    );
    let (status, _, body) = call(&app, "GET", "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    // Every documented route outside the projections' own is served here.
    for path in doc["paths"].as_object().unwrap().keys() {
        if path.starts_with("/v1/projections") || path == "/v1/streams/{category}/{id}" {
            continue;
        }
        if path == "/v1/events/live" {
            // A feed that never ends: served means 200 and an event stream.
            let req = axum::http::Request::builder()
                .uri(path.as_str())
                .body(Body::empty())
                .unwrap();
            let resp = app.clone().oneshot(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
            assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
            continue;
        }
        let uri = path.replace("{id}", "1");
        let method = if doc["paths"][path].get("get").is_some() {
            "GET"
        } else {
            "POST"
        };
        let (status, _, _) = call(&app, method, &uri, Some(TOKEN), None).await;
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert!(
            status != StatusCode::NOT_FOUND
                || uri.starts_with("/v1/dlq/")
                || uri.starts_with("/v1/transfers/"),
            "{path}: {status}"
        );
    }
}

/// The served document checked by `openapi-spec-validator` (OpenAPI 3.1
/// schema and the semantic rules, e.g. declared path parameters),
/// installed into `.tools/venv` by scripts/setup.sh.
#[tokio::test]
async fn the_served_openapi_document_passes_an_external_validator() {
    let validator = std::env::var_os("SLUICE_OPENAPI_VALIDATOR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../.tools/venv/bin/openapi-spec-validator")
        });
    assert!(
        validator.is_file(),
        "{} is missing: run scripts/setup.sh (or set SLUICE_OPENAPI_VALIDATOR)",
        validator.display()
    );
    let (app, _server) = app(HttpOptions::with_token(TOKEN)).await;
    let (status, _, body) = call(&app, "GET", "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, &body).unwrap();
    let out = std::process::Command::new(&validator)
        .args(["--schema", "3.1", "--validation-errors", "all"])
        .arg(&file)
        .output()
        .unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openapi-spec-validator: {report}");
    assert!(report.contains(": OK"), "{report}");
}

#[tokio::test]
async fn a_traceparent_header_travels_with_the_appended_events() {
    let (app, server) = app(HttpOptions::with_token(TOKEN)).await;
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let req = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/streams/account/tp-1")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header("traceparent", tp)
        .body(Body::from(opened()))
        .unwrap();
    assert_eq!(
        app.clone().oneshot(req).await.unwrap().status(),
        StatusCode::CREATED
    );
    let store = server.store().await;
    let id = StreamId::new("account", "tp-1").unwrap();
    let events: Vec<_> = futures::TryStreamExt::try_collect(store.read(&id, 1).await.unwrap())
        .await
        .unwrap();
    assert_eq!(events[0].envelope.traceparent.as_deref(), Some(tp));
}

async fn call_with_key(app: &Router, uri: &str, key: &str, body: &str) -> (StatusCode, String) {
    let (status, _, body) = call_keyed(app, uri, key, body).await;
    (status, body)
}

async fn call_keyed(
    app: &Router,
    uri: &str,
    key: &str,
    body: &str,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let req = axum::http::Request::builder()
        .method("POST")
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", key)
        .body(Body::from(body.to_owned()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

#[tokio::test]
async fn idempotency_keys_make_retries_safe_and_refuse_reuse() {
    let (app, server) = app(HttpOptions::with_token(TOKEN)).await;
    let open = r#"{"id":"a-1","owner":"ann","currency":"EUR"}"#;
    let (s1, b1) = call_with_key(&app, "/v1/accounts", "k-open", open).await;
    assert_eq!(s1, StatusCode::CREATED, "{b1}");
    let (s2, h2, b2) = call_keyed(&app, "/v1/accounts", "k-open", open).await;
    assert_eq!(s2, StatusCode::CREATED, "the first response again: {b2}");
    assert_eq!(h2[IDEMPOTENT_REPLAYED], "true");
    assert_eq!(
        serde_json::from_str::<Value>(&b2).unwrap()["position"],
        serde_json::from_str::<Value>(&b1).unwrap()["position"]
    );
    for i in 0..3 {
        let (s, h, b) = call_keyed(
            &app,
            "/v1/accounts/a-1/deposits",
            "k-dep",
            r#"{"amount":500}"#,
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        assert_eq!(h.contains_key(IDEMPOTENT_REPLAYED), i > 0, "{b}");
        assert_eq!(
            serde_json::from_str::<Value>(&b).unwrap()["replayed"],
            i > 0
        );
    }
    let (s, b) = call_with_key(
        &app,
        "/v1/accounts/a-1/deposits",
        "k-dep",
        r#"{"amount":900}"#,
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    let (s, b) = call_with_key(
        &app,
        "/v1/accounts/a-1/withdrawals",
        "k-wd",
        r#"{"amount":501}"#,
    )
    .await;
    assert_eq!(
        s,
        StatusCode::UNPROCESSABLE_ENTITY,
        "overdraft refused: {b}"
    );
    let store = server.store().await;
    let (account, _) = sluice_ledger::account_state(&store, "a-1").await.unwrap();
    assert_eq!(
        account.balance(),
        500,
        "three deposits with one key moved money once"
    );

    let transfer = r#"{"from":"a-1","to":"b-1","amount":100}"#;
    let (s, b) = call_with_key(&app, "/v1/transfers", "t-key", transfer).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    for _ in 0..2 {
        let (s, b) = call_with_key(&app, "/v1/transfers", "t-key", transfer).await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    let (s, _) = call_with_key(
        &app,
        "/v1/transfers",
        "t-key",
        r#"{"from":"a-1","to":"b-1","amount":101}"#,
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        sluice_ledger::list_transfers(&store, None)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// A request as `call` sends it, from `peer` (as `serve` records it),
/// with extra headers.
async fn call_from(
    app: &Router,
    method: &str,
    uri: &str,
    headers: &[(&str, String)],
    body: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let mut req = axum::http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let mut req = req
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
        .unwrap();
    let peer = headers
        .iter()
        .find(|(k, _)| *k == "x-test-peer")
        .map_or("127.0.0.1:9", |(_, v)| v.as_str());
    req.extensions_mut()
        .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, v)
}

/// Asserts an RFC 9457 problem of `status` and `slug`.
fn assert_problem(
    what: &str,
    got: &(StatusCode, axum::http::HeaderMap, Value),
    status: StatusCode,
    slug: &str,
) {
    let (s, h, body) = got;
    assert_eq!(*s, status, "{what}: {body}");
    assert_eq!(
        h.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap()),
        Some("application/problem+json"),
        "{what}: {body}"
    );
    assert_eq!(body["status"], status.as_u16(), "{what}: {body}");
    assert_eq!(
        body["type"],
        format!("https://sluice.invalid/problems/{slug}"),
        "{what}: {body}"
    );
    assert!(
        body["title"].as_str().is_some_and(|t| !t.is_empty())
            && body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{what}: {body}"
    );
}

fn bearer() -> (&'static str, String) {
    ("authorization", format!("Bearer {TOKEN}"))
}

fn json_type() -> (&'static str, String) {
    ("content-type", "application/json".to_owned())
}

#[tokio::test]
async fn every_error_the_layers_answer_is_a_problem() {
    let mut opts = HttpOptions::with_token(TOKEN);
    opts.body_limit = 1024;
    let (app, server) = app(opts).await;
    let auth = bearer();
    let auth_only = std::slice::from_ref(&auth);
    let got = call_from(&app, "GET", "/v1/nowhere", &[], None).await;
    assert_problem("unknown route", &got, StatusCode::NOT_FOUND, "not-found");
    let got = call_from(&app, "DELETE", "/v1/dlq", auth_only, None).await;
    assert_problem(
        "405",
        &got,
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
    );
    assert!(got.1[header::ALLOW].to_str().unwrap().contains("GET"));
    let huge = format!(r#"{{"amount":1,"pad":"{}"}}"#, "x".repeat(4096));
    let got = call_from(
        &app,
        "POST",
        "/v1/accounts/a-1/deposits",
        &[
            auth.clone(),
            json_type(),
            ("content-length", huge.len().to_string()),
        ],
        Some(&huge),
    )
    .await;
    assert_problem(
        "body limit",
        &got,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload-too-large",
    );
    // Without Content-Length the limit is met while reading.
    let got = call_from(
        &app,
        "POST",
        "/v1/accounts/a-1/deposits",
        &[auth.clone(), json_type()],
        Some(&huge),
    )
    .await;
    assert_problem(
        "streamed body limit",
        &got,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload-too-large",
    );
    let got = call_from(
        &app,
        "POST",
        "/v1/accounts/a-1/deposits",
        auth_only,
        Some(r#"{"amount":1}"#),
    )
    .await;
    assert_problem(
        "no content type",
        &got,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
    );
    let got = call_from(&app, "GET", "/v1/dlq/abc", auth_only, None).await;
    assert_problem(
        "path rejection",
        &got,
        StatusCode::BAD_REQUEST,
        "bad-request",
    );
    let got = call_from(&app, "GET", "/v1/dlq/0", auth_only, None).await;
    assert_problem("dead letter 0", &got, StatusCode::NOT_FOUND, "not-found");
    for (uri, body) in [
        ("/v1/accounts/a-1/deposits", "[5]"),
        ("/v1/accounts", r#"["m2","y","EUR"]"#),
        ("/v1/transfers", r#"["a","b",5]"#),
        ("/v1/accounts/a-1/deposits", r#"{"amount":"five"}"#),
        ("/v1/accounts/a-1/deposits", "5"),
        ("/v1/streams/thing/t-1", r#"[{"type":"t.v1","data":{}}]"#),
    ] {
        let got = call_from(&app, "POST", uri, &[auth.clone(), json_type()], Some(body)).await;
        assert_problem(
            &format!("{uri} {body}"),
            &got,
            StatusCode::BAD_REQUEST,
            "bad-request",
        );
    }
    let store = server.store().await;
    assert_eq!(
        store.stream_state().await.unwrap().messages,
        0,
        "nothing refused was written"
    );
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_the_token_is_not() {
    let (app, _server) = app(HttpOptions::with_token(TOKEN)).await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let got = call_from(
            &app,
            "GET",
            "/v1/dlq",
            &[("authorization", format!("{scheme} {TOKEN}"))],
            None,
        )
        .await;
        assert_eq!(got.0, StatusCode::OK, "{scheme}: {}", got.2);
    }
    for value in [
        format!("Basic {TOKEN}"),
        format!("Bearer{TOKEN}"),
        format!("Bearer {}", TOKEN.to_uppercase()),
        TOKEN.to_owned(),
    ] {
        let got = call_from(
            &app,
            "GET",
            "/v1/dlq",
            &[("authorization", value.clone())],
            None,
        )
        .await;
        assert_problem(&value, &got, StatusCode::UNAUTHORIZED, "unauthorized");
    }
}

#[tokio::test]
async fn refused_domain_commands_are_422_naming_their_rule() {
    let (app, _server) = app(HttpOptions::with_token(TOKEN)).await;
    let (auth, json) = (bearer(), json_type());
    let post = |uri: &'static str, body: &'static str| {
        let app = app.clone();
        let headers = [auth.clone(), json.clone()];
        async move { call_from(&app, "POST", uri, &headers, Some(body)).await }
    };
    let got = post(
        "/v1/accounts",
        r#"{"id":"r-1","owner":"ann","currency":"EUR"}"#,
    )
    .await;
    assert_eq!(got.0, StatusCode::CREATED, "{}", got.2);
    for (uri, body, rule) in [
        (
            "/v1/accounts/r-1/deposits",
            r#"{"amount":0}"#,
            "amount-must-be-positive",
        ),
        (
            "/v1/accounts/r-1/deposits",
            r#"{"amount":-1}"#,
            "amount-must-be-positive",
        ),
        (
            "/v1/accounts/r-1/withdrawals",
            r#"{"amount":5}"#,
            "sufficient-funds",
        ),
        (
            "/v1/accounts",
            r#"{"id":"r-2","owner":"","currency":"EUR"}"#,
            "owner-length",
        ),
        (
            "/v1/accounts",
            r#"{"id":"r-3","owner":"bo","currency":"euro"}"#,
            "currency-code",
        ),
    ] {
        let got = post(uri, body).await;
        assert_problem(
            &format!("{uri} {body}"),
            &got,
            StatusCode::UNPROCESSABLE_ENTITY,
            "rejected",
        );
        assert_eq!(got.2["rule"], rule, "{uri} {body}: {}", got.2);
    }
    for (body, rule) in [
        (
            r#"{"from":"r-1","to":"r-9","amount":0}"#,
            "amount-must-be-positive",
        ),
        (
            r#"{"from":"r-1","to":"r-1","amount":5}"#,
            "accounts-must-differ",
        ),
    ] {
        let got = post("/v1/transfers", body).await;
        assert_problem(body, &got, StatusCode::UNPROCESSABLE_ENTITY, "rejected");
        assert_eq!(got.2["rule"], rule, "{body}: {}", got.2);
    }
    // A conflict stays a conflict; a missing account is not found.
    let got = post(
        "/v1/accounts",
        r#"{"id":"r-1","owner":"ann","currency":"EUR"}"#,
    )
    .await;
    assert_problem("open twice", &got, StatusCode::CONFLICT, "conflict");
    assert_eq!(got.2["rule"], "account-already-open");
    let got = post("/v1/accounts/nobody/deposits", r#"{"amount":5}"#).await;
    assert_problem("no account", &got, StatusCode::NOT_FOUND, "not-found");
}

/// An event published around Sluice (raw NATS, no CloudEvents headers)
/// makes its account unreadable: the answer is a server-side problem
/// naming the position, neither 400 (the client did nothing wrong) nor
/// 503 (retrying will not help).
#[tokio::test]
async fn an_account_holding_an_undecodable_event_names_its_position() {
    let (app, server) = app(HttpOptions::with_token(TOKEN)).await;
    let headers = [bearer(), json_type()];
    let got = call_from(
        &app,
        "POST",
        "/v1/accounts",
        &headers,
        Some(r#"{"id":"u-1","owner":"ann","currency":"EUR"}"#),
    )
    .await;
    assert_eq!(got.0, StatusCode::CREATED, "{}", got.2);
    let store = server.store().await;
    let ack = store
        .jetstream()
        .publish("events.account.u-1", "raw".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let got = call_from(
        &app,
        "POST",
        "/v1/accounts/u-1/deposits",
        &headers,
        Some(r#"{"amount":5}"#),
    )
    .await;
    assert_problem(
        "deposit",
        &got,
        StatusCode::CONFLICT,
        "invalid-stored-event",
    );
    assert_eq!(got.2["position"], ack.sequence, "{}", got.2);
}

#[tokio::test]
async fn probes_are_never_throttled_and_forwarded_clients_have_their_own_budget() {
    let mut opts = HttpOptions::with_token(TOKEN);
    opts.rate_per_sec = 1;
    opts.burst = 1;
    opts.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
    let (app, _server) = app(opts).await;
    for _ in 0..5 {
        for path in ["/healthz", "/readyz", "/metrics"] {
            let got = call_from(&app, "GET", path, &[], None).await;
            assert_eq!(got.0, StatusCode::OK, "{path}: {}", got.2);
        }
    }
    let from = |peer: &str, xff: &str| {
        vec![
            ("x-test-peer", format!("{peer}:4000")),
            ("x-forwarded-for", xff.to_owned()),
        ]
    };
    let doc = "/openapi.json";
    // Two clients behind one trusted proxy: one budget each.
    let got = call_from(&app, "GET", doc, &from("10.0.0.1", "1.1.1.1"), None).await;
    assert_eq!(got.0, StatusCode::OK);
    let got = call_from(&app, "GET", doc, &from("10.0.0.1", "2.2.2.2"), None).await;
    assert_eq!(got.0, StatusCode::OK);
    // A forged left part does not buy a new budget.
    let got = call_from(
        &app,
        "GET",
        doc,
        &from("10.0.0.1", "7.7.7.7, 1.1.1.1"),
        None,
    )
    .await;
    assert_problem(
        "1.1.1.1 again",
        &got,
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
    );
    // An untrusted peer is keyed on itself, whatever it forwards.
    let got = call_from(&app, "GET", doc, &from("3.3.3.3", "4.4.4.4"), None).await;
    assert_eq!(got.0, StatusCode::OK);
    let got = call_from(&app, "GET", doc, &from("3.3.3.3", "5.5.5.5"), None).await;
    assert_problem(
        "3.3.3.3 again",
        &got,
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
    );
}

/// Log lines written anywhere in the process, for asserting on them.
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn gauge(scrape: &str, name: &str, label: &str) -> Option<f64> {
    scrape
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A projection and a worker that cannot store a dead letter (the DLQ is
/// full) stop visibly: `/readyz` is 503 naming both with the reason, the
/// halted gauges are 1 and an error log line says what to do. Once the
/// DLQ has room both resume by themselves: ready again, gauges 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_that_cannot_dead_letter_are_not_ready_and_say_why() {
    use async_nats::jetstream::stream::DiscardPolicy;
    let logs = Logs::default();
    let writer = logs.clone();
    let _ = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .try_init();
    let metrics = metrics_handle();
    let server = sluice_testkit::NatsServer::start();
    let store = server.store().await;
    let home = tempfile::tempdir().unwrap();
    let side = sluice_ledger::ReadSide::with_store(
        store.clone(),
        &sluice_ledger::default_database_url(home.path()),
    )
    .await
    .unwrap();
    let js = store.jetstream().clone();
    sluice_workers::dlq::ensure_streams(&store, 1)
        .await
        .unwrap();
    let mut dlq_stream = js.get_stream("DLQ").await.unwrap();
    let unlimited = dlq_stream.info().await.unwrap().config.clone();
    let mut full = unlimited.clone();
    full.max_messages = 1;
    full.discard = DiscardPolicy::New;
    js.update_stream(full).await.unwrap();
    js.publish("dlq.filler.x", "full".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let shutdown = CancellationToken::new();
    let runner = sluice_projections::RunnerConfig {
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..Default::default()
    };
    let group = sluice_projections::spawn(
        Arc::new(sluice_ledger::AccountBalances::new()),
        side.db.clone(),
        store.clone(),
        runner,
        shutdown.clone(),
    )
    .await
    .unwrap();
    const WORKER: &str = "test-cannot-dead-letter";
    let mut wc = sluice_workers::WorkerConfig::new(WORKER);
    wc.filter_subjects = vec!["events.thing.>".to_owned()];
    wc.ack_wait = Duration::from_secs(2);
    wc.pin_timeout = Duration::from_secs(3);
    wc.retry = sluice_workers::RetryPolicy {
        base: Duration::from_millis(50),
        cap: Duration::from_millis(300),
        max_attempts: 1000,
    };
    let worker = {
        let (store, sd) = (store.clone(), shutdown.clone());
        tokio::spawn(async move {
            sluice_workers::run(
                &store,
                wc,
                |_d: sluice_workers::Delivery| async {
                    Err(sluice_workers::HandlerError::permanent("refused"))
                },
                sd,
            )
            .await
        })
    };
    let append = |stream: (&'static str, &'static str), event: NewEvent| {
        let store = store.clone();
        async move {
            store
                .append(
                    &StreamId::new(stream.0, stream.1).unwrap(),
                    ExpectedVersion::Any,
                    vec![event],
                )
                .await
                .unwrap()
        }
    };
    append(
        ("account", "ghost"),
        NewEvent::new(sluice_ledger::DEPOSITED, r#"{"amount":5}"#),
    )
    .await;
    append(("thing", "t-1"), NewEvent::new("thing.done.v1", "{}")).await;
    let live = group.projections[0].live.clone();
    wait_for("the projection to halt", || {
        live.snapshot().halted.is_some()
    })
    .await;
    wait_for("the worker to halt", || {
        sluice_workers::worker_halts()
            .iter()
            .any(|h| h.worker == WORKER)
    })
    .await;

    let app = router_of(
        store.clone(),
        Some(side.db.clone()),
        vec![(group.projections[0].name, live.clone())],
        &HttpOptions::with_token(TOKEN),
    )
    .await;
    let (status, _, body) = call(&app, "GET", "/readyz", None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["checks"]["projection:account_balances"], "halted",
        "{body}"
    );
    assert_eq!(v["checks"][format!("worker:{WORKER}")], "halted", "{body}");
    for check in [
        "projection:account_balances".to_owned(),
        format!("worker:{WORKER}"),
    ] {
        let why = v["reasons"][&check].as_str().unwrap_or_default();
        assert!(
            why.contains("cannot dead-letter") && why.contains("DLQ"),
            "{body}"
        );
    }
    let (_, _, scrape) = call(&app, "GET", "/metrics", None, None).await;
    assert_eq!(
        gauge(&scrape, "sluice_projection_halted", "account_balances"),
        Some(1.0),
        "{scrape}"
    );
    assert_eq!(
        gauge(&scrape, "sluice_worker_halted", WORKER),
        Some(1.0),
        "{scrape}"
    );
    let text = logs.text();
    assert!(
        text.contains("projection halted: a dead letter cannot be stored")
            && text.contains("worker halted on an aggregate")
            && text.contains("nats stream info DLQ"),
        "{text}"
    );

    // Room in the DLQ again: both store their dead letter and move on.
    js.update_stream(unlimited).await.unwrap();
    wait_for("the projection to resume", || {
        live.snapshot().halted.is_none()
    })
    .await;
    wait_for("the worker to resume", || {
        !sluice_workers::worker_halts()
            .iter()
            .any(|h| h.worker == WORKER)
    })
    .await;
    let (status, _, body) = call(&app, "GET", "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, _, scrape) = call(&app, "GET", "/metrics", None, None).await;
    assert_eq!(
        gauge(&scrape, "sluice_projection_halted", "account_balances"),
        Some(0.0)
    );
    assert_eq!(
        gauge(&scrape, "sluice_worker_halted", WORKER),
        Some(0.0),
        "{scrape}"
    );
    let _ = metrics;
    shutdown.cancel();
    worker.await.unwrap().unwrap();
    let _ = group.task.await;
    let _ = dlq_stream.info().await.unwrap();
}

/// A transfer whose log says what `events` say (no saga role runs, so
/// nothing acts on it).
async fn transfer_with(store: &EventStore, id: &str, events: Vec<sluice_sagas::SagaEvent>) {
    sluice_ledger::start_transfer(store, Some(id), "a-1", "b-1", 5)
        .await
        .unwrap();
    for (i, e) in events.into_iter().enumerate() {
        let appended = sluice_sagas::append_guarded(store, "transfer", id, |_| {
            Ok((e.clone(), format!("{id}/test/{i}")))
        })
        .await
        .unwrap();
        assert!(matches!(appended, sluice_sagas::Guarded::Appended(_)));
    }
}

fn stuck() -> Vec<sluice_sagas::SagaEvent> {
    use sluice_sagas::SagaEvent;
    vec![
        SagaEvent::StepSucceeded {
            step: 0,
            attempt: 1,
            reply: json!({"currency": "EUR"}),
        },
        SagaEvent::StepFailed {
            step: 1,
            attempt: 1,
            reason: "account is closed".into(),
        },
        SagaEvent::CompensationFailed {
            step: 0,
            attempt: 1,
            reason: "account is closed".into(),
            permanent: true,
        },
    ]
}

#[tokio::test]
async fn saga_operator_actions_answer_404_409_or_the_transfer_and_filters_are_checked() {
    use sluice_sagas::SagaEvent;
    let (app, server) = app(HttpOptions::with_token(TOKEN)).await;
    let store = server.store().await;
    for id in ["t-retry", "t-resolve", "t-abandon"] {
        transfer_with(&store, id, stuck()).await;
    }
    let ok = |step| SagaEvent::StepSucceeded {
        step,
        attempt: 1,
        reply: json!({"currency": "EUR"}),
    };
    transfer_with(&store, "t-done", vec![ok(0), ok(1)]).await;
    let note = r#"{"note":"ops: checked the accounts"}"#.to_owned();

    let (s, _, body) = call(&app, "GET", "/v1/transfers?state=bogus", None, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.contains("needs_attention") && body.contains("abandoned"),
        "{body}"
    );
    let (s, _, body) = call(
        &app,
        "GET",
        "/v1/transfers?state=needs_attention",
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["transfers"].as_array().unwrap().len(), 3, "{body}");

    // The token is needed; unknown ids are 404, wrong states 409.
    let (s, _, _) = call(
        &app,
        "POST",
        "/v1/sagas/t-retry/retry",
        None,
        Some(note.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    for action in ["retry", "abandon"] {
        let uri = format!("/v1/sagas/nope/{action}");
        let (s, h, body) = call(&app, "POST", &uri, Some(TOKEN), Some(note.clone())).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(h[header::CONTENT_TYPE], "application/problem+json");
        let uri = format!("/v1/sagas/t-done/{action}");
        let (s, _, body) = call(&app, "POST", &uri, Some(TOKEN), Some(note.clone())).await;
        assert_eq!(s, StatusCode::CONFLICT, "{body}");
        assert!(body.contains("t-done is completed"), "{body}");
    }
    let resolve = r#"{"note":"ops","outcome":"completed"}"#.to_owned();
    let (s, _, _) = call(
        &app,
        "POST",
        "/v1/sagas/nope/resolve",
        Some(TOKEN),
        Some(resolve.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, body) = call(
        &app,
        "POST",
        "/v1/sagas/t-done/resolve",
        Some(TOKEN),
        Some(resolve),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    // Bad bodies are 400.
    for (uri, body) in [
        ("/v1/sagas/t-resolve/resolve", note.clone()),
        (
            "/v1/sagas/t-resolve/resolve",
            r#"{"note":"x","outcome":"bogus"}"#.to_owned(),
        ),
        ("/v1/sagas/t-retry/retry", r#"{"note":"  "}"#.to_owned()),
        ("/v1/sagas/t-retry/retry", "[1]".to_owned()),
    ] {
        let (s, _, b) = call(&app, "POST", uri, Some(TOKEN), Some(body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {b}");
    }

    // Valid: each acts once, and a second call finds the new state.
    let (s, _, body) = call(
        &app,
        "POST",
        "/v1/sagas/t-retry/retry",
        Some(TOKEN),
        Some(note.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(body.contains(r#""state":"pending""#), "{body}");
    let (s, _, body) = call(
        &app,
        "POST",
        "/v1/sagas/t-retry/retry",
        Some(TOKEN),
        Some(note.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("compensating debit"), "{body}");
    let (s, _, body) = call(
        &app,
        "POST",
        "/v1/sagas/t-resolve/resolve",
        Some(TOKEN),
        Some(r#"{"note":"ops: refunded by hand","outcome":"compensated"}"#.to_owned()),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(
        body.contains(r#""state":"compensated""#) && body.contains("refunded by hand"),
        "{body}"
    );
    let (s, _, body) = call(
        &app,
        "POST",
        "/v1/sagas/t-abandon/abandon",
        Some(TOKEN),
        Some(note.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(body.contains(r#""state":"abandoned""#), "{body}");
    let (s, _, body) = call(
        &app,
        "POST",
        "/v1/sagas/t-abandon/resolve",
        Some(TOKEN),
        Some(r#"{"note":"x","outcome":"completed"}"#.to_owned()),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    // Each action is a transition in the saga's log, with its note.
    let log = sluice_sagas::read_log(&store, "transfer", "t-abandon")
        .await
        .unwrap();
    assert!(matches!(
        &log.records.last().unwrap().event,
        SagaEvent::Abandoned { note } if note == "ops: checked the accounts"
    ));
}

async fn balance(store: &EventStore, id: &str) -> i64 {
    sluice_ledger::account_state(store, id)
        .await
        .unwrap()
        .0
        .balance()
}

async fn open_accounts(app: &Router, ids: &[&str]) {
    for id in ids {
        let (s, _, b) = call(
            app,
            "POST",
            "/v1/accounts",
            Some(TOKEN),
            Some(format!(r#"{{"id":"{id}","owner":"ann","currency":"EUR"}}"#)),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }
}

/// Finding 3: keys matched by prefix (`inv` after `inv-x` was "replayed"
/// and not applied; `order-7` after `order-7-2` was a false 422).
#[tokio::test]
async fn idempotency_keys_match_exactly_never_by_prefix() {
    let (app, server) = app(HttpOptions::with_token(TOKEN)).await;
    let store = server.store().await;
    open_accounts(&app, &["a-1"]).await;
    let url = "/v1/accounts/a-1/deposits";
    for (key, amount) in [("inv-x", 5), ("inv", 5), ("order-7-2", 7), ("order-7", 9)] {
        let (s, h, b) = call_keyed(&app, url, key, &format!(r#"{{"amount":{amount}}}"#)).await;
        assert_eq!(s, StatusCode::CREATED, "{key}: {b}");
        assert!(!h.contains_key(IDEMPOTENT_REPLAYED), "{key}: {b}");
    }
    assert_eq!(balance(&store, "a-1").await, 26, "every key applied once");
}

/// Finding 3: arrays (and other non-objects) were taken as bodies:
/// `[5]` became a deposit and `["m2","y","EUR"]` opened an account.
#[tokio::test]
async fn bodies_that_are_not_json_objects_are_refused_with_400() {
    let (app, server) = app(HttpOptions::with_token(TOKEN)).await;
    let store = server.store().await;
    open_accounts(&app, &["a-1"]).await;
    let before = store.stream_state().await.unwrap().messages;
    for (uri, body) in [
        ("/v1/accounts/a-1/deposits", "[5]"),
        ("/v1/accounts/a-1/deposits", "5"),
        ("/v1/accounts/a-1/withdrawals", "[1]"),
        ("/v1/accounts", r#"["m2","y","EUR"]"#),
        ("/v1/accounts", r#""m2""#),
        ("/v1/transfers", r#"["a-1","b-1",5]"#),
        ("/v1/streams/thing/t-1", r#"[[{"type":"t.v1","data":{}}]]"#),
        ("/v1/streams/thing/t-1", r#"{"events":[["t.v1",{}]]}"#),
        ("/v1/streams/thing/t-1", "7"),
    ] {
        let (status, headers, text) =
            call(&app, "POST", uri, Some(TOKEN), Some(body.to_owned())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri} {body}: {text}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        assert!(text.contains("JSON object"), "{text}");
    }
    assert_eq!(store.stream_state().await.unwrap().messages, before);
    assert!(
        !sluice_ledger::account_state(&store, "m2")
            .await
            .unwrap()
            .0
            .exists()
    );
}

/// Finding 5: a key used on one account and then on another answered
/// 200 "replayed" and the second deposit was silently dropped. The
/// second is now refused loudly, naming the first use; same for the key
/// on another operation.
#[tokio::test]
async fn the_same_key_on_two_accounts_never_drops_a_write() {
    let (app, server) = app(HttpOptions::with_token(TOKEN)).await;
    let store = server.store().await;
    open_accounts(&app, &["acc-3", "acc-9"]).await;
    let (s, _, b) = call_keyed(&app, "/v1/accounts/acc-3/deposits", "kk", r#"{"amount":5}"#).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    for uri in [
        "/v1/accounts/acc-9/deposits",
        "/v1/accounts/acc-3/withdrawals",
    ] {
        let (s, h, b) = call_keyed(&app, uri, "kk", r#"{"amount":5}"#).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{uri}: {b}");
        assert_eq!(h[header::CONTENT_TYPE], "application/problem+json");
        let p: Value = serde_json::from_str(&b).unwrap();
        assert!(
            p["type"]
                .as_str()
                .unwrap()
                .ends_with("idempotency-key-reused"),
            "{b}"
        );
        assert!(
            p["detail"]
                .as_str()
                .unwrap()
                .contains("deposit on account/acc-3"),
            "names the first use: {b}"
        );
    }
    assert_eq!(balance(&store, "acc-3").await, 5);
    assert_eq!(balance(&store, "acc-9").await, 0, "refused, and said so");
    // With a key of its own, acc-9's deposit applies.
    let (s, _, b) = call_keyed(
        &app,
        "/v1/accounts/acc-9/deposits",
        "kk-9",
        r#"{"amount":5}"#,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(balance(&store, "acc-9").await, 5);
}

/// Three tries of one deposit, spread over more than the log's
/// duplicate window (shortened to 1 s), and concurrent tries: the money
/// moves once. A try whose holder died after appending (its record left
/// pending) is finished from the log, not applied again.
#[tokio::test]
async fn retries_beyond_the_dedup_window_and_concurrent_ones_move_money_once() {
    let server = sluice_testkit::NatsServer::start();
    let config = StoreConfig {
        duplicate_window: Duration::from_secs(1),
        ..StoreConfig::default()
    };
    let app = app_on(&server, HttpOptions::with_token(TOKEN), config.clone()).await;
    let store = server.store_with(config).await;
    open_accounts(&app, &["a-1"]).await;
    let url = "/v1/accounts/a-1/deposits";
    let mut first = None;
    for i in 0..3 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(1300)).await;
        }
        let (s, _, b) = call_keyed(&app, url, "dep-1", r#"{"amount":100}"#).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        let v: Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["replayed"], i > 0, "{b}");
        first.get_or_insert(v["positions"].clone());
        assert_eq!(Some(&v["positions"]), first.as_ref(), "the first response");
    }
    assert_eq!(balance(&store, "a-1").await, 100);

    let tries = (0..4).map(|_| call_keyed(&app, url, "dep-2", r#"{"amount":10}"#));
    for (s, _, b) in futures::future::join_all(tries).await {
        assert!(
            s == StatusCode::CREATED || (s == StatusCode::CONFLICT && b.contains("in-progress")),
            "{s}: {b}"
        );
    }
    assert_eq!(balance(&store, "a-1").await, 110);

    // A holder that died between its append and recording the answer.
    let kv = store
        .jetstream()
        .get_key_value(sluice_ledger::IDEMPOTENCY_BUCKET)
        .await
        .unwrap();
    let mut record: Value =
        serde_json::from_slice(&kv.get("dep-1").await.unwrap().unwrap()).unwrap();
    record["applied"] = Value::Null;
    record["lease_until_ms"] = json!(0);
    kv.put("dep-1", serde_json::to_vec(&record).unwrap().into())
        .await
        .unwrap();
    let (s, h, b) = call_keyed(&app, url, "dep-1", r#"{"amount":100}"#).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(h[IDEMPOTENT_REPLAYED], "true");
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["positions"],
        first.unwrap()
    );
    assert_eq!(balance(&store, "a-1").await, 110);
}

/// Keys are durable: a repeat after the process and its nats-server
/// restarted is still the first request's answer.
#[tokio::test]
async fn a_repeat_after_a_restart_is_still_recognised() {
    let mut server = sluice_testkit::NatsServer::start();
    let app = app_on(
        &server,
        HttpOptions::with_token(TOKEN),
        StoreConfig::default(),
    )
    .await;
    open_accounts(&app, &["a-1"]).await;
    let url = "/v1/accounts/a-1/deposits";
    let (s, _, first) = call_keyed(&app, url, "dep-r", r#"{"amount":40}"#).await;
    assert_eq!(s, StatusCode::CREATED, "{first}");
    drop(app);
    server.restart();
    let app = app_on(
        &server,
        HttpOptions::with_token(TOKEN),
        StoreConfig::default(),
    )
    .await;
    let (s, h, again) = call_keyed(&app, url, "dep-r", r#"{"amount":40}"#).await;
    assert_eq!(s, StatusCode::CREATED, "{again}");
    assert_eq!(h[IDEMPOTENT_REPLAYED], "true");
    let (a, b): (Value, Value) = (
        serde_json::from_str(&first).unwrap(),
        serde_json::from_str(&again).unwrap(),
    );
    assert_eq!(a["positions"], b["positions"]);
    assert_eq!(balance(&server.store().await, "a-1").await, 40);
}

/// Finding 4 over HTTP: an id used on `thing/t-1` and then on
/// `thing/t-2` answered 201 "deduplicated" while t-2 stayed empty, and
/// a batch with a reused id answered 503.
#[tokio::test]
async fn an_event_id_reused_on_another_stream_is_a_409_id_reused() {
    let (app, server) = app(HttpOptions::with_token(TOKEN)).await;
    let store = server.store().await;
    let one = |data: u32| {
        format!(
            r#"{{"events":[{{"type":"thing.made.v1","id":"same-id-1","data":{{"n":{data}}}}}]}}"#
        )
    };
    let (s, _, b) = call(
        &app,
        "POST",
        "/v1/streams/thing/t-1",
        Some(TOKEN),
        Some(one(1)),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let batch = r#"{"events":[{"type":"thing.made.v1","id":"fresh-1","data":{}},{"type":"thing.made.v1","id":"same-id-1","data":{}}]}"#;
    for body in [one(2), one(1), batch.to_owned()] {
        let (s, h, b) = call(
            &app,
            "POST",
            "/v1/streams/thing/t-2",
            Some(TOKEN),
            Some(body),
        )
        .await;
        assert_eq!(s, StatusCode::CONFLICT, "{b}");
        assert_eq!(h[header::CONTENT_TYPE], "application/problem+json");
        let p: Value = serde_json::from_str(&b).unwrap();
        assert!(p["type"].as_str().unwrap().ends_with("id-reused"), "{b}");
        assert!(p["detail"].as_str().unwrap().contains("thing/t-1"), "{b}");
    }
    let t2 = StreamId::new("thing", "t-2").unwrap();
    assert_eq!(store.last_version(&t2).await.unwrap(), 0);
    // The true retry is still 201, deduplicated.
    let (s, _, b) = call(
        &app,
        "POST",
        "/v1/streams/thing/t-1",
        Some(TOKEN),
        Some(one(1)),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert!(b.contains(r#""deduplicated":true"#), "{b}");
}

/// What client generators need from the document: a unique operationId on
/// every operation, problem documents for every 4xx/5xx, the query and
/// header parameters the routes read, and the headers they answer with.
#[tokio::test]
async fn every_operation_is_described_for_client_generators() {
    let (app, _server) = app(HttpOptions::with_token(TOKEN)).await;
    let (status, _, body) = call(&app, "GET", "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let doc: Value = serde_json::from_str(&body).unwrap();
    let mut ids = std::collections::BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path}: no operationId"));
            assert!(
                ids.insert(id.to_owned()),
                "{method} {path}: operationId {id} twice"
            );
            for (code, resp) in op["responses"].as_object().unwrap() {
                if code.starts_with('4') || code.starts_with('5') {
                    if path == "/readyz" && code == "503" {
                        continue; // the readiness report itself, as JSON
                    }
                    assert!(
                        resp["content"]["application/problem+json"]["schema"]["$ref"]
                            == "#/components/schemas/Problem",
                        "{method} {path} {code}: not a problem document: {resp}"
                    );
                }
            }
        }
    }
    let names = |path: &str, method: &str| -> Vec<String> {
        doc["paths"][path][method]["parameters"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .map(|p| p["name"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let rows = names("/v1/projections/{name}/rows", "get");
    for p in ["limit", "after", "min_position"] {
        assert!(rows.contains(&p.to_owned()), "rows: {rows:?}");
    }
    assert!(
        names("/v1/projections/{name}/rows/{key}", "get").contains(&"If-None-Match".to_owned())
    );
    assert!(names("/v1/accounts/{id}/deposits", "post").contains(&"Idempotency-Key".to_owned()));
    assert!(names("/v1/events", "get").contains(&"after".to_owned()));
    assert!(
        doc["paths"]["/v1/projections/{name}/rows/{key}"]["get"]["responses"]["200"]["headers"]["ETag"]
            .is_object()
    );
    assert!(
        doc["paths"]["/v1/transfers"]["post"]["responses"]["202"]["headers"]["Location"]
            .is_object()
    );
    assert!(
        doc["paths"]["/v1/events"]["get"]["responses"]["429"]["headers"]["Retry-After"].is_object()
    );
    assert!(doc["paths"]["/v1/accounts"]["post"]["requestBody"]["content"]["application/json"]["schema"]["required"]
        .as_array()
        .is_some());
}

/// What schemathesis found, kept fixed: an empty dead-letter filter is no
/// filter, a bad one is a 400 (was a 500); position 0 cannot be voided
/// (was a 500); a discard without its reason is a 400 problem (was axum's
/// bare 422).
#[tokio::test]
async fn fuzzer_findings_answer_as_the_document_says() {
    let (app, _server) = app(HttpOptions::with_token(TOKEN)).await;
    let (s, _, b) = call(
        &app,
        "GET",
        "/v1/dlq?consumer=&category=",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, _, b) = call(&app, "GET", "/v1/dlq?consumer=a.b", Some(TOKEN), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(b.contains("bad-request"), "{b}");
    let (s, _, b) = call(
        &app,
        "POST",
        "/v1/events/0/void",
        Some(TOKEN),
        Some(r#"{"reason":"x"}"#.to_owned()),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, _, b) = call(
        &app,
        "POST",
        "/v1/dlq/1/discard",
        Some(TOKEN),
        Some("{}".to_owned()),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(b.contains("bad-request"), "{b}");
}
