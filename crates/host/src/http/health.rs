//! `/healthz` and `/readyz` (NATS, streams, the read store, projections, consumers).

use super::*;

pub(super) async fn healthz(State(ctx): State<Ctx>) -> Json<Value> {
    Json(json!({"status": "ok", "uptime_secs": ctx.started.elapsed().as_secs()}))
}

pub(super) async fn readyz(State(ctx): State<Ctx>) -> Response {
    let mut checks = serde_json::Map::new();
    let nats = ctx.store.is_connected();
    checks.insert("nats".into(), json!(nats));
    let stream = ctx.store.stream_state().await.is_ok();
    checks.insert("stream".into(), json!(stream));
    let mut ok = nats && stream;
    if let Some(db) = &ctx.db {
        let reachable = sqlx_ping(db).await;
        checks.insert("database".into(), json!(reachable));
        ok &= reachable;
    }
    // What is wrong and what to do, per failing check, for people.
    let mut reasons = serde_json::Map::new();
    for (name, live) in &ctx.live {
        let halted = live.snapshot().halted;
        let check = format!("projection:{name}");
        checks.insert(
            check.clone(),
            json!(if halted.is_some() { "halted" } else { "ok" }),
        );
        ok &= halted.is_none();
        if let Some(why) = halted {
            reasons.insert(check, json!(why));
        }
    }
    // Workers of this process holding an aggregate they cannot dead-letter.
    for halt in sluice_workers::worker_halts() {
        let check = format!("worker:{}", halt.worker);
        checks.insert(check.clone(), json!("halted"));
        reasons.insert(check, json!(halt.reason));
        ok = false;
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({"ready": ok, "checks": checks});
    if !reasons.is_empty() {
        body["reasons"] = Value::Object(reasons);
    }
    (status, Json(body)).into_response()
}

pub(super) async fn sqlx_ping(db: &sluice_projections::Database) -> bool {
    tokio::time::timeout(Duration::from_secs(2), sqlx_ping_inner(db))
        .await
        .unwrap_or(false)
}

pub(super) async fn sqlx_ping_inner(db: &sluice_projections::Database) -> bool {
    db.pool().acquire().await.is_ok()
}
