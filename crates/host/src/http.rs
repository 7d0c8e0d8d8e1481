//! The HTTP API as served by the binary: the projections' query API plus
//! appends, dead-letter operations, health, readiness, metrics and the
//! OpenAPI document, behind bearer-token authentication for everything that
//! changes state or touches dead letters, per-client rate limiting, body size
//! limits and timeouts. CORS is off unless origins are configured. Every
//! error is an RFC 9457 problem (see `sluice_projections::http::problem`).

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, MatchedPath, Path as UrlPath, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_events::{
    Catalog, Error as EventsError, EventId, EventStore, ExpectedVersion, NewEvent, StreamId,
    TraceParent,
};
use sluice_ledger::Idempotency;
use sluice_projections::LiveStatus;
use sluice_projections::http::{
    Problem, ProblemType, json_objects_only, json_rejection, problem_responses,
};
use sluice_workers::dlq::{self, Filter, RedriveTarget};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tower_http::cors::CorsLayer;

use crate::tokens::{ALL_SCOPES, Scope};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tracing::Instrument;

mod conn;
mod tls;

pub(crate) use conn::ConnLimits;
pub(crate) use tls::acceptor as tls_acceptor;

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
    /// Reverse proxies whose `X-Forwarded-For` the rate limiter believes.
    pub(crate) trusted_proxies: Vec<IpNet>,
    /// What one connection may hold: timeouts, the connection cap, header
    /// sizes.
    pub(crate) conn: ConnLimits,
    /// Named, scoped tokens (`sluice token`), besides `token`.
    pub(crate) tokens: Option<Arc<crate::tokens::TokenStore>>,
    /// Whether reads (GET outside `/v1/dlq`) are served without a token.
    pub(crate) open_reads: bool,
    /// Whether `/metrics` is served without a token when reads are not.
    pub(crate) open_metrics: bool,
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
            trusted_proxies: Vec::new(),
            conn: ConnLimits::default(),
            tokens: None,
            open_reads: true,
            open_metrics: true,
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
    idempotency: Idempotency,
    catalog: Arc<Catalog>,
    db: Option<sluice_projections::Database>,
    live: Vec<(&'static str, LiveStatus)>,
    metrics: PrometheusHandle,
    token: Arc<str>,
    tokens: Option<Arc<crate::tokens::TokenStore>>,
    limiter: Arc<DefaultKeyedRateLimiter<IpAddr>>,
    trusted_proxies: Arc<[IpNet]>,
    started: Instant,
    /// `(consumer, category)` pairs the DLQ depth gauge was set for, so a
    /// pair whose dead letters are all gone is set back to 0.
    dlq_seen: Arc<std::sync::Mutex<std::collections::BTreeSet<(String, String)>>>,
}

/// Everything the extra endpoints need.
pub(crate) struct Parts {
    /// The event log.
    pub(crate) store: EventStore,
    /// The idempotency records of keyed requests.
    pub(crate) idempotency: Idempotency,
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
        idempotency: parts.idempotency,
        catalog: parts.catalog,
        db: parts.db,
        live: parts.live,
        metrics: metrics_handle(),
        token: opts.token.clone(),
        tokens: opts.tokens.clone(),
        limiter: Arc::new(RateLimiter::keyed(quota)),
        trusted_proxies: opts.trusted_proxies.clone().into(),
        started: Instant::now(),
        dlq_seen: Arc::default(),
    };
    let protected = Router::new()
        .route("/v1/streams/{category}/{id}", post(append))
        .route("/v1/transfers", post(start_transfer))
        .route("/v1/accounts", post(open_account))
        .route("/v1/accounts/{id}/deposits", post(deposit))
        .route("/v1/accounts/{id}/withdrawals", post(withdraw))
        .route("/v1/sagas/{id}/retry", post(saga_retry))
        .route("/v1/sagas/{id}/resolve", post(saga_resolve))
        .route("/v1/sagas/{id}/abandon", post(saga_abandon))
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
    let mut app = protected.merge(open).with_state(ctx.clone()).merge(queries);
    if !opts.open_reads {
        let exempt = ReadExempt {
            metrics: opts.open_metrics,
        };
        app = app.layer(middleware::from_fn_with_state(
            (ctx.clone(), exempt),
            require_read_token,
        ));
    }
    let mut app = app
        .layer(middleware::from_fn(json_objects_only))
        .layer(middleware::from_fn_with_state(ctx.clone(), rate_limit))
        .layer(middleware::from_fn_with_state(
            HeaderLimits {
                bytes: opts.conn.max_header_bytes,
                fields: opts.conn.max_headers,
            },
            header_limits,
        ))
        .layer(middleware::from_fn(record_metrics))
        .layer(RequestBodyLimitLayer::new(opts.body_limit))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            opts.timeout,
        ))
        // Outermost but CORS: whatever a layer inside answered on its own
        // (404, 405, 408, 413, 415, rejections) leaves as a problem.
        .layer(middleware::from_fn(problem_responses));
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

/// Binds the HTTP API's address, before anything is served, so a taken
/// port is reported as such (with what to do) instead of surfacing later.
pub(crate) async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use std::io::ErrorKind;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let what = match e.kind() {
            ErrorKind::AddrInUse => format!(
                "the HTTP address {addr} is already in use (another sluice or another program listens there): stop that process, or choose another address with --http, SLUICE_HTTP_ADDR or http.addr in the config (port 0 picks a free one)"
            ),
            ErrorKind::PermissionDenied => format!(
                "not allowed to listen on {addr}: use a port above 1023 (--http, SLUICE_HTTP_ADDR or http.addr)"
            ),
            ErrorKind::AddrNotAvailable => format!(
                "{addr} is not an address of this machine: use one of its addresses, 127.0.0.1 or 0.0.0.0 (--http, SLUICE_HTTP_ADDR or http.addr)"
            ),
            _ => format!("binding the HTTP API on {addr}: {e}"),
        };
        anyhow::anyhow!(what)
    })?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "HTTP API listening");
    Ok(listener)
}

/// Serves `app` on a bound `listener` until `shutdown`, with client
/// addresses for the rate limiter and `limits` on what each connection may
/// hold (see [`conn`]); HTTPS when `tls` is given (see [`tls_acceptor`]).
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    conn::serve(listener, app, limits, tls, shutdown).await
}

/// The configured header limits (`http.max_header_bytes`,
/// `http.max_headers`).
#[derive(Debug, Clone, Copy)]
struct HeaderLimits {
    bytes: usize,
    fields: usize,
}

/// Refuses requests whose headers exceed the configured limits with a 431
/// problem. hyper's own limits are [`conn::HARD_LIMIT_FACTOR`] times these,
/// so everything between reaches this layer and gets a body saying what to
/// fix; only beyond does hyper answer a bare 431 and close.
async fn header_limits(State(limits): State<HeaderLimits>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    // As on the wire: `name: value\r\n` per field, plus the request line.
    let bytes = req.method().as_str().len()
        + req.uri().to_string().len()
        + 12
        + headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if headers.len() > limits.fields || bytes > limits.bytes {
        return Problem::of(
            ProblemType::HeadersTooLarge,
            format!(
                "the request line and headers are {bytes} bytes in {} fields; the server takes at most {} bytes in {} fields (http.max_header_bytes, http.max_headers)",
                headers.len(),
                limits.bytes,
                limits.fields
            ),
        )
        .into_response();
    }
    next.run(req).await
}

fn problem(
    status: StatusCode,
    slug: &str,
    title: &'static str,
    detail: impl Into<String>,
) -> Response {
    Problem::new(status, slug, title, detail).into_response()
}

/// The credentials of an `Authorization: Bearer <token>` header. The scheme
/// is case-insensitive (RFC 9110 section 11.1), the token is not.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

/// The scope a request needs: operator actions (dead letters, replay,
/// rebuild, void, forget) `operate`, other changes `write`, reads `read`.
fn required_scope(method: &Method, path: &str) -> Scope {
    let operator = path.starts_with("/v1/dlq")
        || ["/void", "/forget", "/replay", "/rebuild"]
            .iter()
            .any(|s| path.ends_with(s));
    if operator {
        Scope::Operate
    } else if method == Method::GET || method == Method::HEAD {
        Scope::Read
    } else {
        Scope::Write
    }
}

/// The scopes of the request's bearer token; `None` without a known token.
fn token_scopes(ctx: &Ctx, req: &Request) -> Option<Vec<Scope>> {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)?;
    // Constant time, so the comparison does not leak the token's prefix.
    if bool::from(given.as_bytes().ct_eq(ctx.token.as_bytes())) {
        return Some(ALL_SCOPES.to_vec());
    }
    ctx.tokens.as_ref()?.scopes_of(given)
}

/// Lets the request through if its token has the scope it needs: 401
/// without a known token, 403 with one that lacks the scope.
async fn authorize(ctx: &Ctx, req: Request, next: Next) -> Response {
    let needed = required_scope(req.method(), req.uri().path());
    match token_scopes(ctx, &req) {
        Some(scopes) if scopes.contains(&needed) => next.run(req).await,
        Some(_) => {
            let name = format!("{needed:?}").to_lowercase();
            problem(
                StatusCode::FORBIDDEN,
                "forbidden",
                "Forbidden",
                format!(
                    "this token lacks the `{name}` scope this request needs: use a token created with `sluice token create <name> --scope {name}`"
                ),
            )
        }
        None => unauthorized(),
    }
}

async fn require_token(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    authorize(&ctx, req, next).await
}

/// What stays open when reads need a token.
#[derive(Debug, Clone, Copy)]
struct ReadExempt {
    metrics: bool,
}

/// Reads need a `read` token (production): all but the probes, and
/// `/metrics` when configured open. Writes and operator routes are left to
/// their own route layer.
async fn require_read_token(
    State((ctx, exempt)): State<(Ctx, ReadExempt)>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    let open = matches!(path, "/healthz" | "/readyz") || (exempt.metrics && path == "/metrics");
    if open || required_scope(req.method(), path) != Scope::Read {
        return next.run(req).await;
    }
    authorize(&ctx, req, next).await
}

fn unauthorized() -> Response {
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

/// Paths the rate limiter never throttles: probes and scrapes must see a
/// busy server as it is, not be refused by it.
const UNLIMITED_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// The address the rate limiter keys on: the TCP peer, unless the peer is a
/// trusted proxy; then the rightmost `X-Forwarded-For` address that is not
/// a trusted proxy (each proxy appends the address it saw, so everything to
/// the left of the first untrusted hop may be forged by the client).
fn client_address(peer: IpAddr, headers: &axum::http::HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    // Several header lines are one list, in order (RFC 9110 section 5.3).
    let lines: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    for hop in lines.iter().rev().flat_map(|l| l.rsplit(',')) {
        let hop = hop.trim();
        let Some(ip) = hop
            .parse::<IpAddr>()
            .ok()
            .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        else {
            // Not an address: the last trusted hop is all we know.
            return client;
        };
        client = ip;
        if !is_trusted(&ip) {
            return ip;
        }
    }
    client
}

async fn rate_limit(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    if UNLIMITED_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let ip = client_address(peer, req.headers(), &ctx.trusted_proxies);
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
        let now: std::collections::BTreeSet<(String, String)> = listing
            .groups
            .iter()
            .map(|g| (g.consumer.clone(), g.category.clone()))
            .collect();
        for g in &listing.groups {
            metrics::gauge!("sluice_dlq_depth", "consumer" => g.consumer.clone(), "category" => g.category.clone())
                .set(g.count as f64);
        }
        // A group whose dead letters were all redriven or discarded is not
        // in the listing any more: its gauge goes back to 0, not stale.
        let mut seen = ctx.dlq_seen.lock().unwrap_or_else(|p| p.into_inner());
        for (consumer, category) in seen.difference(&now) {
            metrics::gauge!("sluice_dlq_depth", "consumer" => consumer.clone(), "category" => category.clone())
                .set(0.0);
        }
        seen.extend(now);
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

/// A JSON value that must be an object of shape `T`. Derived structs also
/// accept arrays (`[5]` as `{"amount": 5}`), which no client means; every
/// body (and nested object) of the write endpoints goes through this.
#[derive(Debug)]
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Visitor(std::marker::PhantomData))
            .map(Object)
    }
}

/// A request body that must be a JSON object of shape `T`.
type ObjectBody<T> = Result<Json<Object<T>>, JsonRejection>;

/// The body, or a 400 problem saying which `shape` was expected: arrays,
/// numbers and strings where an object belongs are refused like bad JSON.
fn object_body<T>(body: ObjectBody<T>, shape: &str) -> Result<T, Box<Response>> {
    body.map(|Json(Object(b))| b).map_err(|e| {
        Box::new(json_rejection(&e, &format!("a JSON object {shape}")).into_response())
    })
}

/// Body of `POST /v1/streams/{category}/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppendBody {
    /// Expected version: a number, "none" or "any" (default).
    #[serde(default)]
    expected_version: Option<Value>,
    events: Vec<Object<AppendEvent>>,
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
    body: ObjectBody<AppendBody>,
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
    let body = match object_body(
        body,
        r#"{"events": [{"type", "data"}], "expected_version"?}"#,
    ) {
        Ok(b) => b,
        Err(resp) => return *resp,
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
    for Object(e) in body.events {
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
        Err(e @ EventsError::IdReused { .. }) => problem(
            StatusCode::CONFLICT,
            "id-reused",
            "Event id reused",
            e.to_string(),
        ),
        // By kind: bad input 400, trouble reaching NATS 503, else 500.
        Err(e) => Problem::from(e).into_response(),
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
        e if e.is_unknown_instance() => problem(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            e.to_string(),
        ),
        e if e.is_wrong_state() => problem(
            StatusCode::CONFLICT,
            "wrong-state",
            "Not in a state this action applies to",
            e.to_string(),
        ),
        // The transfer's own rules (a positive amount, two accounts).
        sluice_sagas::SagaError::Invalid(msg) => Problem::of(ProblemType::Rejected, msg)
            .with("rule", "transfer")
            .into_response(),
        sluice_sagas::SagaError::Events(e) => Problem::from(e).into_response(),
        other => Problem::internal(other).into_response(),
    }
}

/// The `Idempotency-Key` header; one that is there but unreadable is a
/// 400, never ignored (ignoring it would run a retry twice).
fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<Option<String>, Box<Response>> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(k) => Ok(Some(k.to_owned())),
            Err(_) => Err(Box::new(bad_request(
                "the Idempotency-Key header must be 1-64 letters, digits, '_' or '-'",
            ))),
        },
    }
}

fn key_reused(detail: String) -> Response {
    problem(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
        "Idempotency key reused",
        detail,
    )
}

async fn start_transfer(
    State(ctx): State<Ctx>,
    headers: axum::http::HeaderMap,
    body: ObjectBody<TransferBody>,
) -> Response {
    let b = match object_body(body, r#"{"from", "to", "amount", "id"?}"#) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    if let Err(r) = sluice_ledger::check_transfer(&b.from, &b.to, b.amount) {
        return Problem::of(ProblemType::Rejected, format!("transfer refused: {r}"))
            .with("rule", r.rule())
            .into_response();
    }
    // The transfer id is the idempotency key; a key given both ways must agree.
    let key = match idempotency_key(&headers) {
        Ok(k) => k,
        Err(resp) => return *resp,
    };
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
            Ok(_) => key_reused(format!(
                "Idempotency-Key {:?} was already used for another transfer (other accounts or amount); use a new key for a new transfer",
                t.id
            )),
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

/// Header marking an answer to a repeat of a keyed request: the first
/// response again, nothing done this time.
const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

async fn account_command(
    ctx: &Ctx,
    id: &str,
    command: sluice_ledger::AccountCommand,
    key: Option<String>,
) -> Response {
    let keyed = key.as_deref().map(|k| (&ctx.idempotency, k));
    match sluice_ledger::run_account_command(&ctx.store, id, &command, keyed).await {
        Ok(o) => {
            // A repeat answers the first response (201) again, marked.
            let mut resp = (
                StatusCode::CREATED,
                Json(json!({"id": o.account, "positions": o.positions, "position": o.version, "replayed": o.replayed})),
            )
                .into_response();
            if o.replayed {
                resp.headers_mut()
                    .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
            }
            resp
        }
        Err(e @ sluice_ledger::Error::IdempotencyKeyReused { .. }) => key_reused(e.to_string()),
        Err(e @ sluice_ledger::Error::IdempotencyInProgress(_)) => Problem::new(
            StatusCode::CONFLICT,
            "idempotency-key-in-progress",
            "Request in progress",
            e.to_string(),
        )
        .with_retry_after(1)
        .into_response(),
        Err(sluice_ledger::Error::Rejected(r)) => rejected(&r),
        // An account whose log holds an undecodable event is 500 naming it.
        Err(sluice_ledger::Error::Events(e)) => Problem::from(e).into_response(),
        Err(e) => Problem::internal(e).into_response(),
    }
}

/// A refused account command: 422 naming the rule, except that an account
/// that already exists is a conflict (409) and a missing one is 404.
fn rejected(r: &sluice_ledger::AccountRejection) -> Response {
    let kind = match r {
        sluice_ledger::AccountRejection::AlreadyOpen => ProblemType::Conflict,
        sluice_ledger::AccountRejection::NotFound => ProblemType::NotFound,
        _ => ProblemType::Rejected,
    };
    Problem::of(kind, format!("command refused: {r}"))
        .with("rule", r.rule())
        .into_response()
}

async fn open_account(
    State(ctx): State<Ctx>,
    headers: axum::http::HeaderMap,
    body: ObjectBody<OpenBody>,
) -> Response {
    let b = match object_body(body, r#"{"owner", "currency", "id"?}"#) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let key = match idempotency_key(&headers) {
        Ok(k) => k,
        Err(resp) => return *resp,
    };
    let id =
        b.id.or_else(|| key.clone())
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let cmd = sluice_ledger::AccountCommand::Open {
        owner: b.owner,
        currency: b.currency,
    };
    account_command(&ctx, &id, cmd, key).await
}

/// Deposits and withdrawals: one body shape, one path through the aggregate.
async fn amount_command(
    ctx: &Ctx,
    id: &str,
    headers: &axum::http::HeaderMap,
    body: ObjectBody<AmountBody>,
    command: fn(i64) -> sluice_ledger::AccountCommand,
) -> Response {
    let b = match object_body(body, r#"{"amount": <minor units>}"#) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    match idempotency_key(headers) {
        Ok(key) => account_command(ctx, id, command(b.amount), key).await,
        Err(resp) => *resp,
    }
}

async fn deposit(
    State(ctx): State<Ctx>,
    UrlPath(id): UrlPath<String>,
    headers: axum::http::HeaderMap,
    body: ObjectBody<AmountBody>,
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
    body: ObjectBody<AmountBody>,
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
    let state = match q.state.as_deref().map(str::parse).transpose() {
        Ok(s) => s,
        // An unknown filter value: the request's fault (400), not a rule.
        Err(sluice_sagas::SagaError::Invalid(msg)) => return bad_request(msg),
        Err(e) => return saga_error(e),
    };
    match sluice_ledger::list_transfers(&ctx.store, state).await {
        Ok(v) => Json(json!({"transfers": v})).into_response(),
        Err(e) => saga_error(e),
    }
}

/// Body of `POST /v1/sagas/{id}/retry|resolve|abandon`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperatorBody {
    /// Who and why, kept in the saga's log.
    note: String,
    /// `completed` or `compensated` (resolve only).
    #[serde(default)]
    outcome: Option<String>,
}

/// One operator action on transfer `id`: 200 with the transfer after it,
/// 404 for an unknown id, 409 naming the state when it does not apply.
async fn operate(
    ctx: &Ctx,
    id: &str,
    body: Result<Json<OperatorBody>, axum::extract::rejection::JsonRejection>,
    action: impl FnOnce(Option<&str>) -> Result<sluice_sagas::OperatorAction, String>,
) -> Response {
    let Json(b) = match body {
        Ok(b) => b,
        Err(e) => {
            return bad_request(format!(
                "the body must be {{\"note\": \"who and why\", \"outcome\"?}}: {}",
                e.body_text()
            ));
        }
    };
    let action = match action(b.outcome.as_deref()) {
        Ok(a) => a,
        Err(why) => return bad_request(why),
    };
    match sluice_ledger::operate_transfer(&ctx.store, id, action, &b.note).await {
        Ok(v) => Json(v).into_response(),
        // A blank note or a bad outcome: the request's fault, not a rule.
        Err(sluice_sagas::SagaError::Invalid(msg)) => bad_request(msg),
        Err(e) => saga_error(e),
    }
}

async fn saga_retry(
    State(ctx): State<Ctx>,
    UrlPath(id): UrlPath<String>,
    body: Result<Json<OperatorBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    operate(&ctx, &id, body, |outcome| match outcome {
        None => Ok(sluice_sagas::OperatorAction::Retry),
        Some(_) => Err("retry takes no outcome; use resolve".to_owned()),
    })
    .await
}

async fn saga_resolve(
    State(ctx): State<Ctx>,
    UrlPath(id): UrlPath<String>,
    body: Result<Json<OperatorBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    operate(&ctx, &id, body, |outcome| {
        let Some(outcome) = outcome else {
            return Err(
                "resolve needs {\"outcome\": \"completed\" | \"compensated\", \"note\"}".to_owned(),
            );
        };
        outcome
            .parse()
            .map(sluice_sagas::OperatorAction::Resolve)
            .map_err(|e: sluice_sagas::SagaError| e.to_string())
    })
    .await
}

async fn saga_abandon(
    State(ctx): State<Ctx>,
    UrlPath(id): UrlPath<String>,
    body: Result<Json<OperatorBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    operate(&ctx, &id, body, |outcome| match outcome {
        None => Ok(sluice_sagas::OperatorAction::Abandon),
        Some(_) => Err("abandon takes no outcome; use resolve".to_owned()),
    })
    .await
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
        e @ sluice_workers::Error::NotHead { .. } => problem(
            StatusCode::CONFLICT,
            "not-head",
            "Not the head",
            e.to_string(),
        ),
        e @ sluice_workers::Error::MissingReason => bad_request(e.to_string()),
        other => Problem::internal(other).into_response(),
    }
}

fn projection_dlq_error(e: sluice_projections::Error) -> Response {
    match e {
        sluice_projections::Error::DeadLetters(e) => dlq_error(e),
        other => Problem::internal(other).into_response(),
    }
}

/// The projection a dead letter belongs to, when it is a projection's:
/// its record and parking live in the read store, so settling it needs that.
async fn projection_dead_letter(ctx: &Ctx, id: u64) -> Result<Option<String>, Response> {
    match dlq::show(ctx.store.jetstream(), id).await {
        Ok(e) => Ok(sluice_projections::projection_of(&e.consumer).map(str::to_owned)),
        // Let the caller's own call answer (404, or "already redriven").
        Err(sluice_workers::Error::NotFound(_)) => Ok(None),
        Err(e) => Err(dlq_error(e)),
    }
}

fn no_read_store(projection: &str) -> Response {
    problem(
        StatusCode::CONFLICT,
        "no-read-store",
        "No read store here",
        format!(
            "this dead letter is projection {projection}'s, whose records live in the read store, and this process has none: ask an API replica that has the database, or use `sluice dlq` with --database-url"
        ),
    )
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

/// Hands a worker's dead letter back to it; applies a projection's from the
/// log into the projection (releasing its aggregate): one model, one answer.
async fn dlq_redrive(State(ctx): State<Ctx>, UrlPath(id): UrlPath<u64>) -> Response {
    let projection = match projection_dead_letter(&ctx, id).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    if let Some(name) = projection {
        let Some(db) = ctx.db.clone() else {
            return no_read_store(&name);
        };
        let member = match sluice_ledger::cli::member(&name) {
            Ok(m) => m,
            Err(e) => return Problem::internal(e).into_response(),
        };
        return match sluice_projections::redrive_dead_letter(member, db, ctx.store.clone(), id)
            .await
        {
            Ok(r) => Json(r).into_response(),
            Err(e) => projection_dlq_error(e),
        };
    }
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
    if let Some(db) = &ctx.db {
        // Settles a projection's records too (and a worker's as usual).
        return match sluice_projections::discard(db, &ctx.store, id, &reason).await {
            Ok(d) => Json(d).into_response(),
            Err(e) => projection_dlq_error(e),
        };
    }
    match projection_dead_letter(&ctx, id).await {
        Ok(Some(name)) => return no_read_store(&name),
        Ok(None) => {}
        Err(r) => return r,
    }
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
    let operator_body = json!({"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["note"],
        "properties": {"note": {"type": "string", "minLength": 1}}}}}});
    let resolve_body = json!({"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["note", "outcome"],
        "properties": {"note": {"type": "string", "minLength": 1}, "outcome": {"enum": ["completed", "compensated"]}}}}}});
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {"title": "Sluice", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Event log, read models and operator API of Sluice."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Problem": {"type": "object", "required": ["type", "title", "status", "detail"], "properties": {
                "type": {"type": "string"}, "title": {"type": "string"},
                "status": {"type": "integer"}, "detail": {"type": "string"},
                "rule": {"type": "string", "description": "the domain rule that refused the command (422 rejected)"},
                "position": {"type": "integer", "description": "the stored event that cannot be read (409 invalid-stored-event): void it"}}}}
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
                         "responses": {"201": ok("appended (deduplicated: true for a retry of the same events)"), "400": err("invalid input, unknown event type or schema violation (errors: [{event, pointer, message}])"), "401": err("no or wrong token"), "403": err("reserved category"), "409": err("version conflict, an event id already used by another event (id-reused), or an invalid stored event (invalid-stored-event)"), "413": err("body too large")}}
            },
            "/v1/transfers": {
                "get": {"summary": "Transfers (filter state: pending, completed, compensated, needs_attention, abandoned)",
                        "parameters": [{"name": "state", "in": "query", "required": false,
                                        "schema": {"enum": ["pending", "completed", "compensated", "needs_attention", "abandoned"]}}],
                        "responses": {"200": ok("transfers"), "400": err("unknown state")}},
                "post": {"summary": "Start a transfer saga (id = idempotency key)", "security": secured,
                         "requestBody": {"content": {"application/json": {"schema": {"type": "object", "required": ["from", "to", "amount"],
                            "properties": {"from": {"type": "string"}, "to": {"type": "string"}, "amount": {"type": "integer", "minimum": 1}, "id": {"type": "string"}}}}}},
                         "responses": {"202": ok("started"), "200": ok("already started"), "400": err("invalid input"), "401": err("no or wrong token"), "422": err("refused by a rule (positive amount, two accounts)")}}
            },
            "/v1/accounts": {"post": {"summary": "Open an account (Idempotency-Key)", "security": secured, "responses": {"201": ok("opened (a repeat with the same key: the first response, Idempotent-Replayed: true)"), "404": err("no such account"), "409": err("already open, a version conflict, or the key's first request still in progress"), "422": err("refused by a rule (rule), or the key used for another request")}}},
            "/v1/accounts/{id}/deposits": {"post": {"summary": "Deposit (Idempotency-Key)", "security": secured, "responses": {"201": ok("deposited (a repeat with the same key: the first response, Idempotent-Replayed: true)"), "404": err("no such account"), "409": err("already open, a version conflict, or the key's first request still in progress"), "422": err("refused by a rule (rule), or the key used for another request")}}},
            "/v1/accounts/{id}/withdrawals": {"post": {"summary": "Withdraw, never below zero (Idempotency-Key)", "security": secured, "responses": {"201": ok("withdrawn (a repeat with the same key: the first response, Idempotent-Replayed: true)"), "404": err("no such account"), "409": err("already open, a version conflict, or the key's first request still in progress"), "422": err("refused by a rule (rule), or the key used for another request")}}},
            "/v1/transfers/{id}": {"get": {"summary": "One transfer's state", "responses": {"200": ok("transfer"), "404": err("unknown transfer")}}},
            "/v1/sagas/{id}/retry": {"post": {"summary": "Send the command a transfer that needs attention is stuck on again (next attempt; money moves at most once per step)", "security": secured,
                "requestBody": operator_body.clone(),
                "responses": {"200": ok("the transfer after the retry"), "400": err("no note"), "401": err("no or wrong token"), "404": err("unknown transfer"), "409": err("the transfer does not need attention (the detail names its state)")}}},
            "/v1/sagas/{id}/resolve": {"post": {"summary": "State the outcome (completed or compensated) of a transfer that needs attention; nothing moves", "security": secured,
                "requestBody": resolve_body,
                "responses": {"200": ok("the transfer after it"), "400": err("no note or outcome"), "401": err("no or wrong token"), "404": err("unknown transfer"), "409": err("the transfer does not need attention (the detail names its state)")}}},
            "/v1/sagas/{id}/abandon": {"post": {"summary": "Stop a transfer that needs attention without acting (fixed by hand); nothing moves", "security": secured,
                "requestBody": operator_body,
                "responses": {"200": ok("the transfer after it"), "400": err("no note"), "401": err("no or wrong token"), "404": err("unknown transfer"), "409": err("the transfer does not need attention (the detail names its state)")}}},
            "/v1/dlq": {"get": {"summary": "Dead letters (filter consumer, category, reason)", "security": secured, "responses": {"200": ok("listing"), "401": err("no or wrong token")}}},
            "/v1/dlq/{id}": {"get": {"summary": "One dead letter", "security": secured, "responses": {"200": ok("dead letter"), "404": err("unknown id")}}},
            "/v1/dlq/{id}/redrive": {"post": {"summary": "Hand a dead letter back to its consumer, or apply a projection's into it from the log (idempotent)", "security": secured, "responses": {"200": ok("redrive report"), "404": err("unknown id"), "409": err("parked behind an earlier dead letter, or a projection's without a read store here")}}},
            "/v1/dlq/{id}/discard": {"post": {"summary": "Discard a dead letter (and a projection's record and parking), with a reason kept for audit", "security": secured, "responses": {"200": ok("discarded"), "400": err("no reason"), "404": err("unknown id"), "409": err("a projection's dead letter without a read store here")}}},
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
    declare_common_responses(&mut doc);
    doc
}

/// The answers the layers around every route can give (so a generated
/// client knows them): 401 and 403 (a missing token, or one without the
/// route's scope) on secured operations, 431 (oversized headers) everywhere,
/// 429 (rate limited) everywhere but the probes; an operation's own
/// description wins.
fn declare_common_responses(doc: &mut Value) {
    let problem = |d: &str| json!({"description": d, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}});
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        // Probes are never rate limited.
        let probe = matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics");
        let Some(ops) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in ops.iter_mut() {
            if method == "parameters" {
                continue;
            }
            let secured = op.get("security").is_some();
            let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
                continue;
            };
            let mut add = |code: &str, d: &str| {
                responses.entry(code).or_insert_with(|| problem(d));
            };
            if secured {
                add("401", "no or wrong token");
                add("403", "the token lacks the scope this route needs");
            }
            if !probe {
                add("429", "rate limited (Retry-After)");
            }
            add("431", "request headers too large");
        }
    }
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
    use sluice_events::StoreConfig;
    use tower::ServiceExt;

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
        let idempotency = Idempotency::open(
            store.jetstream(),
            sluice_ledger::IdempotencyConfig::default(),
        )
        .await
        .unwrap();
        router(
            Router::new(),
            Parts {
                store,
                idempotency,
                db: None,
                live: Vec::new(),
                catalog: Arc::new(crate::commands::catalog().unwrap()),
            },
            &opts,
        )
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
        let (app, _server) = app(opts).await;
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
        let store = _server.store().await;
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

    #[test]
    fn the_client_address_comes_from_trusted_proxies_only() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let xff = |v: &[&str]| {
            let mut h = axum::http::HeaderMap::new();
            for line in v {
                h.append("x-forwarded-for", line.parse().unwrap());
            }
            h
        };
        // An untrusted peer's header is ignored.
        assert_eq!(
            client_address(ip("3.3.3.3"), &xff(&["4.4.4.4"]), &trusted),
            ip("3.3.3.3")
        );
        // No proxies configured: the peer, always.
        assert_eq!(
            client_address(ip("10.0.0.1"), &xff(&["4.4.4.4"]), &[]),
            ip("10.0.0.1")
        );
        // The rightmost address that is not a trusted proxy; what the client
        // put to the left of it is not believed.
        for (lines, want) in [
            (&["1.1.1.1"][..], "1.1.1.1"),
            (&["9.9.9.9, 1.1.1.1"], "1.1.1.1"),
            (&["9.9.9.9, 1.1.1.1, 10.2.3.4"], "1.1.1.1"),
            (&["9.9.9.9", "1.1.1.1, 10.2.3.4"], "1.1.1.1"),
            (&["1.1.1.1:4711"], "1.1.1.1"),
            (&["10.1.1.1, 10.2.2.2"], "10.1.1.1"),
            (&["garbage, 10.2.2.2"], "10.2.2.2"),
            (&[], "10.0.0.1"),
        ] {
            assert_eq!(
                client_address(ip("10.0.0.1"), &xff(lines), &trusted),
                ip(want),
                "{lines:?}"
            );
        }
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
        sluice_workers::dlq::ensure_streams(&js, 1).await.unwrap();
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

        let idempotency = Idempotency::open(
            store.jetstream(),
            sluice_ledger::IdempotencyConfig::default(),
        )
        .await
        .unwrap();
        let app = router(
            Router::new(),
            Parts {
                store: store.clone(),
                idempotency,
                db: Some(side.db.clone()),
                live: vec![(group.projections[0].name, live.clone())],
                catalog: Arc::new(crate::commands::catalog().unwrap()),
            },
            &HttpOptions::with_token(TOKEN),
        );
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
        let (s, _, b) =
            call_keyed(&app, "/v1/accounts/acc-3/deposits", "kk", r#"{"amount":5}"#).await;
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
                s == StatusCode::CREATED
                    || (s == StatusCode::CONFLICT && b.contains("in-progress")),
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
