//! The HTTP API as served by the binary: the projections' query API plus
//! appends, dead-letter operations, health, readiness, metrics and the
//! OpenAPI document, behind bearer-token authentication for everything that
//! changes state or touches dead letters, per-client rate limiting, body size
//! limits and timeouts. CORS is off unless origins are configured.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{ConnectInfo, MatchedPath, Path as UrlPath, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_events::{
    Catalog, Error as EventsError, EventId, EventStore, ExpectedVersion, NewEvent, StreamId,
    TraceParent,
};
use sluice_projections::LiveStatus;
use sluice_projections::http::Problem;
use sluice_workers::dlq::{self, Filter, RedriveTarget};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tower_http::cors::CorsLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tracing::Instrument;

/// Limits and security of the HTTP API.
#[derive(Debug, Clone)]
pub(crate) struct HttpOptions {
    /// The bearer token mutating and admin endpoints require.
    pub(crate) token: Arc<str>,
    /// Sustained requests per second per client address.
    pub(crate) rate_per_sec: u32,
    /// Burst per client address.
    pub(crate) burst: u32,
    /// Largest request body.
    pub(crate) body_limit: usize,
    /// Longest request (read-your-writes waits count).
    pub(crate) timeout: Duration,
    /// Origins allowed by CORS; empty = CORS off.
    pub(crate) cors_origins: Vec<String>,
}

impl HttpOptions {
    /// Defaults around a token.
    pub(crate) fn with_token(token: impl Into<Arc<str>>) -> Self {
        Self {
            token: token.into(),
            rate_per_sec: 200,
            burst: 400,
            body_limit: 1024 * 1024,
            timeout: Duration::from_secs(30),
            cors_origins: Vec::new(),
        }
    }
}

/// Reads the API token from `path`, creating a random one (mode 0600) when
/// the file does not exist, so a new user is never locked out nor left open.
pub(crate) fn load_or_create_token(path: &Path) -> anyhow::Result<(String, bool)> {
    if path.exists() {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("reading the API token {}", path.display()))?
            .trim()
            .to_owned();
        anyhow::ensure!(
            token.len() >= 16,
            "the API token in {} is shorter than 16 characters",
            path.display()
        );
        return Ok((token, false));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let token = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating the API token {}", path.display()))?;
    std::io::Write::write_all(&mut f, token.as_bytes())?;
    Ok((token, true))
}

/// The process-wide Prometheus recorder (installed once).
pub(crate) fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            handle
        })
        .clone()
}

#[derive(Clone)]
struct Ctx {
    store: EventStore,
    catalog: Arc<Catalog>,
    db: Option<sluice_projections::Database>,
    live: Vec<(&'static str, LiveStatus)>,
    metrics: PrometheusHandle,
    token: Arc<str>,
    limiter: Arc<DefaultKeyedRateLimiter<IpAddr>>,
    started: Instant,
}

/// Everything the extra endpoints need.
pub(crate) struct Parts {
    /// The event log.
    pub(crate) store: EventStore,
    /// The read store, when this process has one (for readiness).
    pub(crate) db: Option<sluice_projections::Database>,
    /// Projections running in this process (for readiness and metrics).
    pub(crate) live: Vec<(&'static str, LiveStatus)>,
    /// What the public append accepts (built once at start-up).
    pub(crate) catalog: Arc<Catalog>,
}

/// The full router: `queries` (the projections' API) plus the rest, with
/// the security layers around it.
pub(crate) fn router(queries: Router, parts: Parts, opts: &HttpOptions) -> Router {
    let quota =
        Quota::per_second(NonZeroU32::new(opts.rate_per_sec.max(1)).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(opts.burst.max(1)).unwrap_or(NonZeroU32::MIN));
    let ctx = Ctx {
        store: parts.store,
        catalog: parts.catalog,
        db: parts.db,
        live: parts.live,
        metrics: metrics_handle(),
        token: opts.token.clone(),
        limiter: Arc::new(RateLimiter::keyed(quota)),
        started: Instant::now(),
    };
    let protected = Router::new()
        .route("/v1/streams/{category}/{id}", post(append))
        .route("/v1/transfers", post(start_transfer))
        .route("/v1/accounts", post(open_account))
        .route("/v1/accounts/{id}/deposits", post(deposit))
        .route("/v1/accounts/{id}/withdrawals", post(withdraw))
        .route("/v1/dlq", get(dlq_list))
        .route("/v1/dlq/{id}", get(dlq_show))
        .route("/v1/dlq/{id}/redrive", post(dlq_redrive))
        .route("/v1/dlq/{id}/discard", post(dlq_discard))
        .route("/v1/events/{position}/void", post(void_event))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), require_token));
    let open = Router::new()
        .route("/v1/transfers", get(list_transfers))
        .route("/v1/transfers/{id}", get(get_transfer))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
        .route("/openapi.json", get(openapi));
    let mut app = protected
        .merge(open)
        .with_state(ctx.clone())
        .merge(queries)
        .layer(middleware::from_fn_with_state(ctx.clone(), rate_limit))
        .layer(middleware::from_fn(record_metrics))
        .layer(RequestBodyLimitLayer::new(opts.body_limit))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            opts.timeout,
        ));
    if !opts.cors_origins.is_empty() {
        let origins: Vec<HeaderValue> = opts
            .cors_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        app = app.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    app
}

/// Serves `app` on `addr` until `shutdown`, with client addresses for the
/// rate limiter; reports the bound address.
pub(crate) async fn serve(
    addr: SocketAddr,
    app: Router,
    shutdown: CancellationToken,
    bound: tokio::sync::oneshot::Sender<SocketAddr>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the HTTP API on {addr}"))?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "HTTP API listening");
    let _ = bound.send(local);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await?;
    Ok(())
}

fn problem(
    status: StatusCode,
    slug: &str,
    title: &'static str,
    detail: impl Into<String>,
) -> Response {
    Problem::new(status, slug, title, detail).into_response()
}

async fn require_token(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant time, so the comparison does not leak the token's prefix.
    if bool::from(given.as_bytes().ct_eq(ctx.token.as_bytes())) {
        return next.run(req).await;
    }
    let mut resp = problem(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Unauthorized",
        "this endpoint needs `Authorization: Bearer <token>`; `sluice up` writes the token to .sluice/token",
    );
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

async fn rate_limit(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    match ctx.limiter.check_key(&ip) {
        Ok(()) => next.run(req).await,
        Err(not_until) => {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            let secs = wait.as_secs().max(1);
            Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
                format!("slow down: retry in {secs} s"),
            )
            .with_retry_after(secs)
            .into_response()
        }
    }
}

/// Metrics and the server span of every request. The span continues an
/// incoming W3C `traceparent` header, else starts a trace; events appended
/// while handling the request carry its context in `ce-traceparent`.
async fn record_metrics(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().to_string();
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    sluice_events::trace::set_parent(
        &span,
        req.headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok()),
    );
    let started = Instant::now();
    let resp = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", resp.status().as_u16());
    if resp.status().is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    let status = resp.status().as_u16().to_string();
    metrics::counter!("sluice_http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("sluice_http_request_duration_seconds", "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    resp
}

async fn healthz(State(ctx): State<Ctx>) -> Json<Value> {
    Json(json!({"status": "ok", "uptime_secs": ctx.started.elapsed().as_secs()}))
}

async fn readyz(State(ctx): State<Ctx>) -> Response {
    let mut checks = serde_json::Map::new();
    let nats = ctx.store.client().connection_state() == async_nats::connection::State::Connected;
    checks.insert("nats".into(), json!(nats));
    let stream = ctx.store.stream_state().await.is_ok();
    checks.insert("stream".into(), json!(stream));
    let mut ok = nats && stream;
    if let Some(db) = &ctx.db {
        let reachable = sqlx_ping(db).await;
        checks.insert("database".into(), json!(reachable));
        ok &= reachable;
    }
    for (name, live) in &ctx.live {
        let halted = live.snapshot().halted.is_some();
        checks.insert(
            format!("projection:{name}"),
            json!(if halted { "halted" } else { "ok" }),
        );
        ok &= !halted;
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": ok, "checks": checks}))).into_response()
}

async fn sqlx_ping(db: &sluice_projections::Database) -> bool {
    tokio::time::timeout(Duration::from_secs(2), sqlx_ping_inner(db))
        .await
        .unwrap_or(false)
}

async fn sqlx_ping_inner(db: &sluice_projections::Database) -> bool {
    db.pool().acquire().await.is_ok()
}

async fn prometheus(State(ctx): State<Ctx>) -> Response {
    // Gauges read at scrape time, from the sources of truth.
    if let Ok(state) = ctx.store.stream_state().await {
        metrics::gauge!("sluice_stream_last_position").set(state.last_position as f64);
        metrics::gauge!("sluice_stream_events").set(state.messages as f64);
        for (name, live) in &ctx.live {
            let snap = live.snapshot();
            metrics::gauge!("sluice_projection_checkpoint", "projection" => *name)
                .set(snap.checkpoint as f64);
            metrics::gauge!("sluice_projection_lag_events", "projection" => *name)
                .set(state.last_position.saturating_sub(snap.checkpoint) as f64);
            if let Some(db) = &ctx.db
                && let Ok(st) =
                    sluice_projections::projection_status(db, &ctx.store, name, Some(live)).await
            {
                metrics::gauge!("sluice_projection_lag_seconds", "projection" => *name)
                    .set(st.lag_seconds);
            }
            metrics::gauge!("sluice_projection_halted", "projection" => *name)
                .set(if snap.halted.is_some() { 1.0 } else { 0.0 });
        }
    }
    let gc = ctx.store.group_commit_stats();
    metrics::gauge!("sluice_group_commit_batches").set(gc.batches as f64);
    metrics::gauge!("sluice_group_commit_events").set(gc.events as f64);
    metrics::gauge!("sluice_group_commit_fsyncs_saved").set(gc.fsyncs_saved as f64);
    metrics::gauge!("sluice_group_commit_conflicts_resolved").set(gc.conflicts_resolved as f64);
    if let Ok(listing) = dlq::list(ctx.store.jetstream(), &Filter::default()).await {
        for g in &listing.groups {
            metrics::gauge!("sluice_dlq_depth", "consumer" => g.consumer.clone(), "category" => g.category.clone())
                .set(g.count as f64);
        }
    }
    if let Some(db) = &ctx.db {
        match sluice_ledger::transfer_counts(db).await {
            Ok(counts) => {
                for (state, n) in counts {
                    metrics::gauge!("sluice_sagas", "saga" => "transfer", "state" => state)
                        .set(n as f64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not count transfers by state"),
        }
    }
    metrics::gauge!("sluice_nats_connected").set(
        if ctx.store.client().connection_state() == async_nats::connection::State::Connected {
            1.0
        } else {
            0.0
        },
    );
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ctx.metrics.render(),
    )
        .into_response()
}

/// Body of `POST /v1/streams/{category}/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppendBody {
    /// Expected version: a number, "none" or "any" (default).
    #[serde(default)]
    expected_version: Option<Value>,
    events: Vec<AppendEvent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppendEvent {
    #[serde(rename = "type")]
    event_type: String,
    data: Value,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    correlationid: Option<String>,
    #[serde(default)]
    causationid: Option<String>,
}

fn bad_request(detail: impl Into<String>) -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        "bad-request",
        "Bad request",
        detail,
    )
}

async fn append(
    State(ctx): State<Ctx>,
    UrlPath((category, id)): UrlPath<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Result<Json<AppendBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    // W3C trace context travels on with the events (`ce-traceparent`), so
    // consumers continue the trace: this request's span when traces are
    // exported, else the caller's valid `traceparent` header as it came.
    let traceparent = sluice_events::trace::current().or_else(|| {
        headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .filter(|v| TraceParent::parse(v).is_some())
            .map(str::to_owned)
    });
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => {
            return bad_request(format!(
                "the body must be {{\"events\": [{{\"type\", \"data\"}}], \"expected_version\"?}}: {}",
                e.body_text()
            ));
        }
    };
    let stream = match StreamId::new(category, id) {
        Ok(s) => s,
        Err(e) => return bad_request(e.to_string()),
    };
    let expected = match &body.expected_version {
        None => ExpectedVersion::Any,
        Some(Value::String(s)) if s == "any" => ExpectedVersion::Any,
        Some(Value::String(s)) if s == "none" => ExpectedVersion::NoStream,
        Some(Value::Number(n)) if n.as_u64().is_some() => {
            ExpectedVersion::from_version(n.as_u64().unwrap_or(0))
        }
        Some(other) => {
            return bad_request(format!(
                "expected_version {other} must be a number, \"none\" or \"any\""
            ));
        }
    };
    let mut events = Vec::with_capacity(body.events.len());
    for e in body.events {
        let data = match serde_json::to_vec(&e.data) {
            Ok(d) => d,
            Err(err) => return bad_request(err.to_string()),
        };
        let mut ev = NewEvent::new(e.event_type, data)
            .with_source(e.source.unwrap_or_else(|| "urn:sluice:http".into()));
        if let Some(id) = e.id {
            match EventId::parse(&id) {
                Ok(id) => ev = ev.with_id(id),
                Err(err) => return bad_request(err.to_string()),
            }
        }
        if let Some(c) = e.correlationid {
            ev = ev.with_correlation_id(c);
        }
        if let Some(c) = e.causationid {
            ev = ev.with_causation_id(c);
        }
        if ev.traceparent.is_none() {
            ev.traceparent.clone_from(&traceparent);
        }
        events.push(ev);
    }
    if let Err(e) = ctx.catalog.check_all(&stream, &events) {
        return refused(e);
    }
    match ctx.store.append(&stream, expected, events).await {
        Ok(r) => (
            StatusCode::CREATED,
            Json(json!({"stream": stream.to_string(), "positions": r.positions, "version": r.version, "deduplicated": r.deduplicated})),
        )
            .into_response(),
        Err(EventsError::Conflict {
            expected, actual, ..
        }) => problem(
            StatusCode::CONFLICT,
            "conflict",
            "Version conflict",
            format!("expected version {expected}, actual {actual}: reload the aggregate and retry"),
        ),
        Err(e) if e.is_invalid_input() => bad_request(e.to_string()),
        Err(e) => Problem::internal(e).into_response(),
    }
}

/// The answer when the catalog refuses an append (nothing was written).
///
/// A reserved category is 403: the request is understood and well-formed,
/// but no caller of the public API may write there (the platform writes it
/// itself, and NATS permissions deny it to non-platform users), so
/// re-sending it can never succeed. Unknown types and schema violations are
/// 400: the caller's data is wrong.
pub(crate) fn refused(e: EventsError) -> Response {
    match e {
        EventsError::ReservedCategory { ref category, .. } => Problem::new(
            StatusCode::FORBIDDEN,
            "reserved-category",
            "Reserved category",
            e.to_string(),
        )
        .with("category", json!(category))
        .into_response(),
        EventsError::UnknownEventType { ref known, .. } => Problem::new(
            StatusCode::BAD_REQUEST,
            "unknown-event-type",
            "Unknown event type",
            e.to_string(),
        )
        .with("known", json!(known))
        .into_response(),
        EventsError::SchemaViolation {
            index,
            ref violations,
            ..
        } => {
            let errors: Vec<Value> = violations
                .iter()
                .map(|v| json!({"event": index, "pointer": v.pointer, "message": v.message}))
                .collect();
            Problem::new(
                StatusCode::BAD_REQUEST,
                "schema-violation",
                "Event data does not match its schema",
                e.to_string(),
            )
            .with("errors", Value::Array(errors))
            .into_response()
        }
        other if other.is_invalid_input() => bad_request(other.to_string()),
        other => Problem::internal(other).into_response(),
    }
}

/// Body of `POST /v1/events/{position}/void`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VoidBody {
    reason: String,
}

async fn void_event(
    State(ctx): State<Ctx>,
    UrlPath(position): UrlPath<String>,
    body: Result<Json<VoidBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(position) = position.parse::<u64>() else {
        return bad_request(format!(
            "position {:?} is not a log position (a positive integer)",
            position.chars().take(32).collect::<String>()
        ));
    };
    let reason = match body {
        Ok(Json(b)) if !b.reason.trim().is_empty() => b.reason,
        Ok(_) => return bad_request("voiding needs a non-empty reason (kept for audit)"),
        Err(e) => {
            return bad_request(format!(
                "the body must be {{\"reason\": \"...\"}}: {}",
                e.body_text()
            ));
        }
    };
    match ctx.store.void(position, &reason).await {
        Ok(v) => Json(v).into_response(),
        Err(EventsError::NoSuchEvent(p)) => problem(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            format!("no event at position {p}"),
        ),
        Err(e @ EventsError::NotVoidable { .. }) => problem(
            StatusCode::CONFLICT,
            "not-voidable",
            "Cannot be voided",
            e.to_string(),
        ),
        Err(e) => Problem::internal(e).into_response(),
    }
}

/// Body of `POST /v1/transfers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferBody {
    from: String,
    to: String,
    amount: i64,
    /// Transfer id and idempotency key (default: a new UUIDv7).
    #[serde(default)]
    id: Option<String>,
}

fn saga_error(e: sluice_sagas::SagaError) -> Response {
    match e {
        sluice_sagas::SagaError::Invalid(msg) => bad_request(msg),
        sluice_sagas::SagaError::Events(e) if e.is_invalid_input() => bad_request(e.to_string()),
        other => Problem::internal(other).into_response(),
    }
}

fn idempotency_key(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn key_reused(key: &str) -> Response {
    problem(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
        "Idempotency key reused",
        format!("Idempotency-Key {key:?} was already used for a different request"),
    )
}

async fn start_transfer(
    State(ctx): State<Ctx>,
    headers: axum::http::HeaderMap,
    body: Result<Json<TransferBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(b) = match body {
        Ok(b) => b,
        Err(e) => {
            return bad_request(format!(
                "the body must be {{\"from\", \"to\", \"amount\", \"id\"?}}: {}",
                e.body_text()
            ));
        }
    };
    // The transfer id is the idempotency key; a key given both ways must agree.
    let key = idempotency_key(&headers);
    let id = match (b.id.as_deref(), key.as_deref()) {
        (Some(a), Some(k)) if a != k => {
            return bad_request("the body's id and the Idempotency-Key differ");
        }
        (a, k) => a.or(k).map(str::to_owned),
    };
    match sluice_ledger::start_transfer(&ctx.store, id.as_deref(), &b.from, &b.to, b.amount).await {
        Ok(t) if !t.created => match sluice_ledger::transfer_status(&ctx.store, &t.id).await {
            Ok(Some(v)) if v.from == b.from && v.to == b.to && v.amount == b.amount => (
                StatusCode::OK,
                [(header::LOCATION, format!("/v1/transfers/{}", t.id))],
                Json(
                    json!({"id": t.id, "position": t.position, "created": false, "state": v.state}),
                ),
            )
                .into_response(),
            Ok(_) => key_reused(&t.id),
            Err(e) => saga_error(e),
        },
        Ok(t) => (
            if t.created {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            },
            [(header::LOCATION, format!("/v1/transfers/{}", t.id))],
            Json(json!({"id": t.id, "position": t.position, "created": t.created})),
        )
            .into_response(),
        Err(e) => saga_error(e),
    }
}

async fn get_transfer(State(ctx): State<Ctx>, UrlPath(id): UrlPath<String>) -> Response {
    if let Err(e) = sluice_events::validate_token("transfer id", &id) {
        return bad_request(e.to_string());
    }
    match sluice_ledger::transfer_status(&ctx.store, &id).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            format!("no transfer {id}"),
        ),
        Err(e) => saga_error(e),
    }
}

/// Body of `POST /v1/accounts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenBody {
    #[serde(default)]
    id: Option<String>,
    owner: String,
    currency: String,
}

/// Body of deposits and withdrawals.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AmountBody {
    amount: i64,
}

async fn account_command(
    ctx: &Ctx,
    id: &str,
    command: sluice_ledger::AccountCommand,
    headers: &axum::http::HeaderMap,
) -> Response {
    let key = idempotency_key(headers);
    match sluice_ledger::run_account_command(&ctx.store, id, &command, key.as_deref()).await {
        Ok(o) => (
            if o.replayed { StatusCode::OK } else { StatusCode::CREATED },
            Json(json!({"id": o.account, "positions": o.positions, "position": o.version, "replayed": o.replayed})),
        )
            .into_response(),
        Err(sluice_ledger::Error::IdempotencyKeyReused(k)) => key_reused(&k),
        Err(sluice_ledger::Error::Rejected(r)) => problem(StatusCode::CONFLICT, "rejected", "Command refused", r.to_string()),
        Err(sluice_ledger::Error::Events(e)) if e.stored_event_position().is_some() => {
            Problem::from_events(e).into_response()
        }
        Err(sluice_ledger::Error::Events(e)) if e.is_invalid_input() => bad_request(e.to_string()),
        Err(e) => Problem::internal(e).into_response(),
    }
}

async fn open_account(
    State(ctx): State<Ctx>,
    headers: axum::http::HeaderMap,
    body: Result<Json<OpenBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(b) = match body {
        Ok(b) => b,
        Err(e) => {
            return bad_request(format!(
                "the body must be {{\"owner\", \"currency\", \"id\"?}}: {}",
                e.body_text()
            ));
        }
    };
    let id =
        b.id.or_else(|| idempotency_key(&headers))
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let cmd = sluice_ledger::AccountCommand::Open {
        owner: b.owner,
        currency: b.currency,
    };
    account_command(&ctx, &id, cmd, &headers).await
}

/// Deposits and withdrawals: one body shape, one path through the aggregate.
async fn amount_command(
    ctx: &Ctx,
    id: &str,
    headers: &axum::http::HeaderMap,
    body: Result<Json<AmountBody>, axum::extract::rejection::JsonRejection>,
    command: fn(i64) -> sluice_ledger::AccountCommand,
) -> Response {
    match body {
        Ok(Json(b)) => account_command(ctx, id, command(b.amount), headers).await,
        Err(e) => bad_request(format!(
            "the body must be {{\"amount\": <minor units>}}: {}",
            e.body_text()
        )),
    }
}

async fn deposit(
    State(ctx): State<Ctx>,
    UrlPath(id): UrlPath<String>,
    headers: axum::http::HeaderMap,
    body: Result<Json<AmountBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    amount_command(&ctx, &id, &headers, body, |amount| {
        sluice_ledger::AccountCommand::Deposit {
            amount,
            currency: None,
        }
    })
    .await
}

async fn withdraw(
    State(ctx): State<Ctx>,
    UrlPath(id): UrlPath<String>,
    headers: axum::http::HeaderMap,
    body: Result<Json<AmountBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    amount_command(&ctx, &id, &headers, body, |amount| {
        sluice_ledger::AccountCommand::Withdraw {
            amount,
            currency: None,
        }
    })
    .await
}

#[derive(Debug, Deserialize)]
struct TransferQuery {
    state: Option<String>,
}

async fn list_transfers(State(ctx): State<Ctx>, Query(q): Query<TransferQuery>) -> Response {
    match sluice_ledger::list_transfers(&ctx.store, q.state.as_deref()).await {
        Ok(v) => Json(json!({"transfers": v})).into_response(),
        Err(e) => saga_error(e),
    }
}

#[derive(Debug, Deserialize)]
struct DlqQuery {
    consumer: Option<String>,
    category: Option<String>,
    reason: Option<String>,
}

fn dlq_error(e: sluice_workers::Error) -> Response {
    match e {
        sluice_workers::Error::NotFound(id) => problem(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            format!("no dead letter {id}"),
        ),
        other => Problem::internal(other).into_response(),
    }
}

async fn dlq_list(State(ctx): State<Ctx>, Query(q): Query<DlqQuery>) -> Response {
    let filter = Filter {
        consumer: q.consumer,
        category: q.category,
        reason: q.reason,
    };
    match dlq::list(ctx.store.jetstream(), &filter).await {
        Ok(listing) => Json(listing).into_response(),
        Err(e) => dlq_error(e),
    }
}

async fn dlq_show(State(ctx): State<Ctx>, UrlPath(id): UrlPath<u64>) -> Response {
    match dlq::show(ctx.store.jetstream(), id).await {
        Ok(d) => Json(d).into_response(),
        Err(e) => dlq_error(e),
    }
}

async fn dlq_redrive(State(ctx): State<Ctx>, UrlPath(id): UrlPath<u64>) -> Response {
    match dlq::redrive(ctx.store.jetstream(), RedriveTarget::Id(id)).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => dlq_error(e),
    }
}

#[derive(Debug, Deserialize)]
struct DiscardBody {
    reason: String,
}

async fn dlq_discard(
    State(ctx): State<Ctx>,
    UrlPath(id): UrlPath<u64>,
    body: Option<Json<DiscardBody>>,
) -> Response {
    let Some(Json(DiscardBody { reason })) = body.filter(|b| !b.reason.trim().is_empty()) else {
        return bad_request("discarding needs {\"reason\": \"...\"}, kept for audit");
    };
    match dlq::discard(ctx.store.jetstream(), id, &reason).await {
        Ok(d) => Json(d).into_response(),
        Err(e) => dlq_error(e),
    }
}

/// The OpenAPI 3.1 document of this router (kept next to the routes; a test
/// checks every documented path is served).
pub(crate) fn openapi_document() -> Value {
    let problem = json!({"$ref": "#/components/schemas/Problem"});
    let err = |d: &str| json!({"description": d, "content": {"application/problem+json": {"schema": problem}}});
    let ok = |d: &str| json!({"description": d, "content": {"application/json": {"schema": {"type": "object"}}}});
    let secured = json!([{"bearer": []}]);
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {"title": "Sluice", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Event log, read models and operator API of Sluice."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Problem": {"type": "object", "properties": {
                "type": {"type": "string"}, "title": {"type": "string"},
                "status": {"type": "integer"}, "detail": {"type": "string"}}}}
        },
        "paths": {
            "/v1/projections": {"get": {"summary": "Projections with checkpoint, lag and state", "responses": {"200": ok("projection list")}}},
            "/v1/projections/{name}": {"get": {"summary": "One projection's status", "responses": {"200": ok("status"), "404": err("unknown projection")}}},
            "/v1/projections/{name}/rows": {"get": {"summary": "Rows, cursor-paginated (limit, after, min_position)", "responses": {"200": ok("page of rows"), "503": err("min_position not reached in time")}}},
            "/v1/projections/{name}/rows/{key}": {"get": {"summary": "One row (ETag = checkpoint; min_position waits for read-your-writes)", "responses": {"200": ok("row"), "404": err("no such row"), "503": err("min_position not reached in time")}}},
            "/v1/streams/{category}/{id}": {
                "get": {"summary": "An aggregate's events", "responses": {"200": ok("events"), "400": err("invalid id")}},
                "post": {"summary": "Append events (atomic, optimistic concurrency)", "security": secured,
                         "requestBody": {"content": {"application/json": {"schema": {"type": "object", "required": ["events"],
                            "properties": {"expected_version": {"oneOf": [{"type": "integer"}, {"enum": ["none", "any"]}]},
                                           "events": {"type": "array", "items": {"type": "object", "required": ["type", "data"]}}}}}}},
                         "responses": {"201": ok("appended"), "400": err("invalid input, unknown event type or schema violation (errors: [{event, pointer, message}])"), "401": err("no or wrong token"), "403": err("reserved category"), "409": err("version conflict"), "413": err("body too large")}}
            },
            "/v1/transfers": {
                "get": {"summary": "Transfers (filter state: pending, completed, compensated, needs_attention)", "responses": {"200": ok("transfers")}},
                "post": {"summary": "Start a transfer saga (id = idempotency key)", "security": secured,
                         "requestBody": {"content": {"application/json": {"schema": {"type": "object", "required": ["from", "to", "amount"],
                            "properties": {"from": {"type": "string"}, "to": {"type": "string"}, "amount": {"type": "integer", "minimum": 1}, "id": {"type": "string"}}}}}},
                         "responses": {"202": ok("started"), "200": ok("already started"), "400": err("invalid input"), "401": err("no or wrong token")}}
            },
            "/v1/accounts": {"post": {"summary": "Open an account (Idempotency-Key)", "security": secured, "responses": {"201": ok("opened"), "200": ok("replayed"), "409": err("refused"), "422": err("key reused")}}},
            "/v1/accounts/{id}/deposits": {"post": {"summary": "Deposit (Idempotency-Key)", "security": secured, "responses": {"201": ok("deposited"), "200": ok("replayed"), "409": err("refused"), "422": err("key reused")}}},
            "/v1/accounts/{id}/withdrawals": {"post": {"summary": "Withdraw, never below zero (Idempotency-Key)", "security": secured, "responses": {"201": ok("withdrawn"), "200": ok("replayed"), "409": err("refused"), "422": err("key reused")}}},
            "/v1/transfers/{id}": {"get": {"summary": "One transfer's state", "responses": {"200": ok("transfer"), "404": err("unknown transfer")}}},
            "/v1/dlq": {"get": {"summary": "Dead letters (filter consumer, category, reason)", "security": secured, "responses": {"200": ok("listing"), "401": err("no or wrong token")}}},
            "/v1/dlq/{id}": {"get": {"summary": "One dead letter", "security": secured, "responses": {"200": ok("dead letter"), "404": err("unknown id")}}},
            "/v1/dlq/{id}/redrive": {"post": {"summary": "Hand a dead letter back to its consumer (idempotent)", "security": secured, "responses": {"200": ok("redrive report")}}},
            "/v1/dlq/{id}/discard": {"post": {"summary": "Discard a dead letter, with a reason kept for audit", "security": secured, "responses": {"200": ok("discarded"), "400": err("no reason")}}},
            "/v1/events/{position}/void": {"post": {"summary": "Void a bad event: every consumer skips it (idempotent; audited as an event on sluice-void)", "security": secured,
                         "requestBody": {"content": {"application/json": {"schema": {"type": "object", "required": ["reason"], "properties": {"reason": {"type": "string", "minLength": 1}}}}}},
                         "responses": {"200": ok("the void"), "400": err("no reason or bad position"), "401": err("no or wrong token"), "404": err("no event there"), "409": err("a void record cannot be voided")}}},
            "/healthz": {"get": {"summary": "Process alive", "responses": {"200": ok("alive")}}},
            "/readyz": {"get": {"summary": "NATS, streams, database and projections ready", "responses": {"200": ok("ready"), "503": ok("not ready")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition format"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": ok("OpenAPI 3.1")}}}
        }
    });
    declare_path_parameters(&mut doc);
    doc
}

/// OpenAPI requires every `{name}` in a path template to be declared as a
/// parameter; deriving them from the templates keeps the two from drifting.
fn declare_path_parameters(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| {
                // Dead letters are addressed by their DLQ sequence number.
                let schema = if path.starts_with("/v1/dlq/") || path.starts_with("/v1/events/") {
                    json!({"type": "integer", "minimum": 1})
                } else {
                    json!({"type": "string"})
                };
                json!({"name": name, "in": "path", "required": true, "schema": schema})
            })
            .collect();
        if !params.is_empty() {
            item["parameters"] = Value::Array(params);
        }
    }
}

async fn openapi() -> Json<Value> {
    Json(openapi_document())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    const TOKEN: &str = "test-token-0123456789abcdef";

    async fn app(opts: HttpOptions) -> (Router, sluice_testkit::NatsServer) {
        let server = sluice_testkit::NatsServer::start();
        let store = server.store().await;
        let router = router(
            Router::new(),
            Parts {
                store,
                db: None,
                live: Vec::new(),
                catalog: Arc::new(crate::commands::catalog().unwrap()),
            },
            &opts,
        );
        (router, server)
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
        let (status, headers, _) = call(&app, "GET", "/healthz", None, None).await;
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
            body.contains("sluice_http_requests_total")
                && body.contains("sluice_stream_last_position"),
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
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
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
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn idempotency_keys_make_retries_safe_and_refuse_reuse() {
        let (app, server) = app(HttpOptions::with_token(TOKEN)).await;
        let open = r#"{"id":"a-1","owner":"ann","currency":"EUR"}"#;
        let (s1, b1) = call_with_key(&app, "/v1/accounts", "k-open", open).await;
        assert_eq!(s1, StatusCode::CREATED, "{b1}");
        let (s2, b2) = call_with_key(&app, "/v1/accounts", "k-open", open).await;
        assert_eq!(s2, StatusCode::OK, "{b2}");
        for _ in 0..3 {
            let (s, b) = call_with_key(
                &app,
                "/v1/accounts/a-1/deposits",
                "k-dep",
                r#"{"amount":500}"#,
            )
            .await;
            assert!(s == StatusCode::CREATED || s == StatusCode::OK, "{b}");
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
        assert_eq!(s, StatusCode::CONFLICT, "overdraft refused: {b}");
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

    #[test]
    fn tokens_are_created_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let (t1, created) = load_or_create_token(&path).unwrap();
        assert!(created && t1.len() >= 32);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (t2, created) = load_or_create_token(&path).unwrap();
        assert!(!created);
        assert_eq!(t1, t2);
        std::fs::write(&path, "short").unwrap();
        assert!(load_or_create_token(&path).is_err());
    }
}
