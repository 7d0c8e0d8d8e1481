//! The shop end to end against a real nats-server and a real read store
//! (SQLite and PostgreSQL): the stock command handler, the order
//! orchestrator and both projections run in-process, driven through the
//! shop's HTTP routes.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use shop::{
    MIGRATOR, ORDERS, OrderConfig, RECEIVED, RELEASED, RESERVED, STOCK_COMMANDS, STOCK_LEVELS,
    routes, run_order_orchestrator, run_stock_commands,
};
use sluice_events::StreamId;
use sluice_projections::{Database, ReadModel, RunnerConfig};
use sluice_testkit::{NatsServer, TestDatabase};
use sluice_workers::WorkerConfig;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const WAIT: Duration = Duration::from_secs(30);

async fn call(app: &Router, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    let req = Request::builder().method(method).uri(uri);
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    };
    let resp = app.clone().oneshot(req.unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Polls `check` until it gives a value; fails after [`WAIT`].
async fn wait_for<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Places an order and waits until it is confirmed or cancelled.
async fn order(app: &Router, id: &str, lines: Value) -> Value {
    let body = json!({"id": id, "customer": "ann", "lines": lines});
    let (status, placed) = call(app, "POST", "/v1/orders", Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
    assert_eq!(placed["id"], id);
    assert!(placed["position"].as_u64().unwrap() > 0);
    let uri = format!("/v1/orders/{id}");
    wait_for(&format!("order {id} to end"), async || {
        let (status, view) = call(app, "GET", &uri, None).await;
        assert_eq!(status, StatusCode::OK, "{view}");
        (view["state"] != "placed").then_some(view)
    })
    .await
}

async fn receive(app: &Router, sku: &str, quantity: i64) {
    let uri = format!("/v1/stock/{sku}/receipts");
    let (status, body) = call(app, "POST", &uri, Some(json!({"quantity": quantity}))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// Waits until `model`'s row `key` has `fields`.
async fn wait_row(db: &Database, model: &dyn ReadModel, key: &str, fields: Value) -> Value {
    let mut conn = db.pool().acquire().await.unwrap();
    wait_for(
        &format!("{} row {key} to be {fields}", model.name()),
        async || {
            let row = model.get(&mut conn, key).await.unwrap()?;
            let all = fields.as_object()?.iter().all(|(k, v)| row[k] == *v);
            all.then_some(row)
        },
    )
    .await
}

async fn orders_reserve_sell_or_cancel_and_release(db_url: &str) {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let db = Database::connect(db_url).await.unwrap();
    db.migrate(&MIGRATOR).await.unwrap();
    let shutdown = CancellationToken::new();
    let projections = sluice_host::Module::projections(&shop::module());
    let members = projections.iter().map(|p| p.member().clone()).collect();
    let model = |name| {
        projections
            .iter()
            .find(|p| p.name() == name)
            .unwrap()
            .read_model()
            .as_ref()
    };
    let (levels, orders) = (model(STOCK_LEVELS), model(ORDERS));
    let group = sluice_projections::spawn_group(
        members,
        db.clone(),
        store.clone(),
        RunnerConfig::default(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let (s, c) = (store.clone(), shutdown.clone());
    let handler =
        tokio::spawn(
            async move { run_stock_commands(&s, WorkerConfig::new(STOCK_COMMANDS), c).await },
        );
    let (s, c) = (store.clone(), shutdown.clone());
    let orchestrator =
        tokio::spawn(async move { run_order_orchestrator(&s, &OrderConfig::default(), c).await });
    let app = routes(store.clone());

    // Bad receipts are refused before anything is written.
    for (body, status, kind) in [
        (
            json!({"quantity": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "rejected",
        ),
        (
            json!({"quantity": -2}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "rejected",
        ),
        (json!({}), StatusCode::BAD_REQUEST, "bad-request"),
        (
            json!({"quantity": 1.5}),
            StatusCode::BAD_REQUEST,
            "bad-request",
        ),
    ] {
        let (s, problem) = call(&app, "POST", "/v1/stock/apple/receipts", Some(body)).await;
        assert_eq!(s, status, "{problem}");
        assert!(
            problem["type"].as_str().unwrap().ends_with(kind),
            "{problem}"
        );
    }
    let (s, problem) = call(
        &app,
        "POST",
        "/v1/stock/a.b/receipts",
        Some(json!({"quantity": 1})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{problem}");

    // 5 apples; orders of 2, 2 and 4, one after the other.
    receive(&app, "apple", 5).await;
    let line = |q: i64| json!([{"sku": "apple", "quantity": q}]);
    assert_eq!(order(&app, "o-1", line(2)).await["state"], "confirmed");
    assert_eq!(order(&app, "o-2", line(2)).await["state"], "confirmed");
    let third = order(&app, "o-3", line(4)).await;
    assert_eq!(third["state"], "cancelled");
    assert_eq!(
        third["reason"],
        "insufficient stock for sku apple: available 1, asked 4"
    );
    let counts = json!({"available": 1, "reserved": 0, "sold": 4});
    wait_row(&db, levels, "apple", counts).await;

    // Two SKUs, the second short: the first's reservation is released.
    receive(&app, "pear", 3).await;
    receive(&app, "plum", 1).await;
    let lines = json!([{"sku": "pear", "quantity": 2}, {"sku": "plum", "quantity": 5}]);
    let fourth = order(&app, "o-4", lines).await;
    let why = "insufficient stock for sku plum: available 1, asked 5";
    assert_eq!(fourth["state"], "cancelled");
    assert_eq!(fourth["reason"], why);
    let history = store
        .history(&StreamId::new("stock", "pear").unwrap())
        .await
        .unwrap();
    let types: Vec<&str> = history
        .events
        .iter()
        .map(|e| e.envelope.event_type.as_str())
        .collect();
    assert_eq!(types, [RECEIVED, RESERVED, RELEASED]);
    let untouched = json!({"available": 3, "reserved": 0, "sold": 0});
    wait_row(&db, levels, "pear", untouched).await;
    wait_row(&db, levels, "plum", json!({"available": 1, "reserved": 0})).await;

    // The orders read model says the same as the saga logs.
    let cancelled = json!({"state": "cancelled", "reason": why, "customer": "ann"});
    let row = wait_row(&db, orders, "o-4", cancelled).await;
    assert_eq!(row["lines"][1], json!({"sku": "plum", "quantity": 5}));
    wait_row(
        &db,
        orders,
        "o-1",
        json!({"state": "confirmed", "reason": null}),
    )
    .await;

    // A repeated placement starts nothing; unknown orders are 404; bad
    // orders are refused naming the rule.
    let again = json!({"id": "o-1", "customer": "ann", "lines": line(2)});
    let (s, body) = call(&app, "POST", "/v1/orders", Some(again)).await;
    assert_eq!(
        (s, &body["created"]),
        (StatusCode::OK, &json!(false)),
        "{body}"
    );
    let (s, _) = call(&app, "GET", "/v1/orders/nope", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let empty = json!({"customer": "ann", "lines": []});
    let (s, problem) = call(&app, "POST", "/v1/orders", Some(empty)).await;
    assert_eq!(
        (s, &problem["rule"]),
        (StatusCode::UNPROCESSABLE_ENTITY, &json!("line-count"))
    );

    shutdown.cancel();
    handler.await.unwrap().unwrap();
    orchestrator.await.unwrap().unwrap();
    group.task.await.unwrap().unwrap();
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("read.db").display());
    orders_reserve_sell_or_cancel_and_release(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    sqlx::any::install_default_drivers();
    let db = TestDatabase::fresh("shop_orders");
    let mut admin = sqlx::AnyConnection::connect(&TestDatabase::admin_url())
        .await
        .unwrap();
    let create = format!("CREATE DATABASE \"{}\"", db.name);
    sqlx::query(&create).execute(&mut admin).await.unwrap();
    orders_reserve_sell_or_cancel_and_release(&db.url).await;
    let drop = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", db.name);
    sqlx::query(&drop).execute(&mut admin).await.unwrap();
}
