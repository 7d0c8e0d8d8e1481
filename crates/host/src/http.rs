//! The HTTP API as served by the binary: the projections' query API plus
//! appends, dead-letter operations, health, readiness, metrics and the
//! OpenAPI document, behind bearer-token authentication for everything that
//! changes state or touches dead letters, per-client rate limiting, body size
//! limits and timeouts. CORS is off unless origins are configured. Every
//! error is an RFC 9457 problem (see [`problem`]). A module's routes use
//! the helpers here ([`object_body`], [`idempotency_key`], [`saga_error`],
//! [`openapi`]) so its answers look like the platform's.

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
pub use problem::{Problem, ProblemType};
use problem::{json_objects_only, json_rejection, problem_responses};
pub use projections::{
    AppState, AppStateBuilder, DEFAULT_LIMIT, MAX_LIMIT, MIN_POSITION_HEADER, PARKED_BEHIND,
    app as queries, serve as serve_queries,
};
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_events::{
    Catalog, Error as EventsError, EventId, EventStore, ExpectedVersion, NewEvent, StreamId,
    TraceParent,
};
use sluice_projections::LiveStatus;
use sluice_workers::dlq::{self, Filter, RedriveTarget};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tower_http::cors::CorsLayer;

use crate::module::{App, RouteContext};
use crate::tokens::{ALL_SCOPES, Scope};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tracing::Instrument;

mod conn;
pub mod problem;
mod projections;
mod tls;

pub use conn::ConnLimits;
pub(crate) use tls::acceptor as tls_acceptor;

/// Limits and security of the HTTP API.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// The bearer token mutating and admin endpoints require.
    pub token: Arc<str>,
    /// Sustained requests per second per client address.
    pub rate_per_sec: u32,
    /// Burst per client address.
    pub burst: u32,
    /// Largest request body.
    pub body_limit: usize,
    /// Longest request (read-your-writes waits count).
    pub timeout: Duration,
    /// Origins allowed by CORS; empty = CORS off.
    pub cors_origins: Vec<String>,
    /// Reverse proxies whose `X-Forwarded-For` the rate limiter believes.
    pub trusted_proxies: Vec<IpNet>,
    /// What one connection may hold: timeouts, the connection cap, header
    /// sizes.
    pub conn: ConnLimits,
    /// Named, scoped tokens (`sluice token`), besides `token`.
    pub(crate) tokens: Option<Arc<crate::tokens::TokenStore>>,
    /// Whether reads (GET outside `/v1/dlq`) are served without a token.
    pub open_reads: bool,
    /// Whether `/metrics` is served without a token when reads are not.
    pub open_metrics: bool,
}

impl HttpOptions {
    /// Defaults around a token.
    pub fn with_token(token: impl Into<Arc<str>>) -> Self {
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
pub fn load_or_create_token(path: &Path) -> anyhow::Result<(String, bool)> {
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
pub fn metrics_handle() -> PrometheusHandle {
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
    app: App,
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
    /// The modules (their metrics and OpenAPI paths).
    pub(crate) app: App,
    /// The modules' routes (see [`module_routes`]).
    pub(crate) routes: Router,
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
        app: parts.app,
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
        .route("/v1/dlq", get(dlq_list))
        .route("/v1/dlq/{id}", get(dlq_show))
        .route("/v1/dlq/{id}/redrive", post(dlq_redrive))
        .route("/v1/dlq/{id}/discard", post(dlq_discard))
        .route("/v1/events/{position}/void", post(void_event))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), require_token));
    let open = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
        .route("/openapi.json", get(openapi_route));
    // A module's routes: reads as the query API's, anything else behind
    // the token with the scope its method and path need.
    let modules = parts.routes.route_layer(middleware::from_fn_with_state(
        ctx.clone(),
        require_token_for_writes,
    ));
    let mut app = protected
        .merge(open)
        .with_state(ctx.clone())
        .merge(queries)
        .merge(modules);
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

/// A problem document answer (RFC 9457): `status`, the type's `slug`
/// (under the problem base URL), its `title` and this case's `detail`.
pub fn problem(
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

/// The whole HTTP API of `app` over `store`, as `up` and `serve --role
/// api` serve it: the platform's routes, the query API over the modules'
/// read models in `db` (with `live`, the status of projections running in
/// this process), the modules' routes, and the security layers of `opts`.
/// For tests and for embedding the API in another server.
pub async fn app_router(
    app: &App,
    store: EventStore,
    db: Option<sluice_projections::Database>,
    live: Vec<(&'static str, LiveStatus)>,
    replicas: usize,
    idempotency_retention: Duration,
    opts: &HttpOptions,
) -> anyhow::Result<Router> {
    let queries = match &db {
        Some(db) => {
            let mut state = AppState::builder(store.clone(), db.clone());
            for p in app.projections() {
                let l = live
                    .iter()
                    .find(|(n, _)| *n == p.name())
                    .map(|(_, l)| l.clone());
                state = state.read_model(p.read_model().clone(), l);
            }
            queries(state.build())
        }
        None => Router::new(),
    };
    let route_ctx = RouteContext {
        store: store.clone(),
        db: db.clone(),
        replicas,
        idempotency_retention,
    };
    let parts = Parts {
        store,
        db,
        live,
        app: app.clone(),
        catalog: Arc::new(app.catalog()?),
        routes: module_routes(app, &route_ctx).await?,
    };
    Ok(router(queries, parts, opts))
}

/// Every module's routes, merged (a path two modules both route is a
/// start-up error, not a silent winner).
pub(crate) async fn module_routes(app: &App, ctx: &RouteContext) -> anyhow::Result<Router> {
    let mut all = Router::new();
    for m in &app.modules {
        let routes = m
            .routes(ctx)
            .await
            .map_err(|e| anyhow::anyhow!("module {}: setting up its routes: {e}", m.name()))?;
        all = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| all.merge(routes)))
            .map_err(|_| {
                anyhow::anyhow!(
                    "module {} routes a path another module (or the platform) already routes",
                    m.name()
                )
            })?;
    }
    Ok(all)
}

/// For a module's routes: reads pass (the read-token layer, when reads
/// are not open, has checked them), anything else needs the token.
async fn require_token_for_writes(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return next.run(req).await;
    }
    authorize(&ctx, req, next).await
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
        for m in &ctx.app.modules {
            m.refresh_metrics(db).await;
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
pub struct Object<T>(pub T);

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
pub type ObjectBody<T> = Result<Json<Object<T>>, JsonRejection>;

/// The body, or a 400 problem saying which `shape` was expected: arrays,
/// numbers and strings where an object belongs are refused like bad JSON.
pub fn object_body<T>(body: ObjectBody<T>, shape: &str) -> Result<T, Box<Response>> {
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

/// A 400 problem with `detail`.
pub fn bad_request(detail: impl Into<String>) -> Response {
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

/// A saga call's error as a problem: 404 unknown instance, 409 wrong state,
/// 422 a rule of the saga, else the event store's or 500.
pub fn saga_error(e: sluice_sagas::SagaError) -> Response {
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
pub fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<Option<String>, Box<Response>> {
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

/// 422: the idempotency key stood for another request.
pub fn key_reused(detail: String) -> Response {
    problem(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
        "Idempotency key reused",
        detail,
    )
}

/// Header marking an answer to a repeat of a keyed request: the first
/// response again, nothing done this time.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

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
        let member = match ctx.app.projection(&name) {
            Ok(m) => m.member().clone(),
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
/// OpenAPI pieces a module's [`Module::openapi`](crate::Module::openapi)
/// builds its paths from, so every module's operations look alike.
pub mod openapi {
    use serde_json::{Value, json};

    /// A JSON response described by `description`.
    pub fn ok(description: &str) -> Value {
        json!({"description": description, "content": {"application/json": {"schema": {"type": "object"}}}})
    }

    /// A problem-document response described by `description`.
    pub fn err(description: &str) -> Value {
        json!({"description": description, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
    }

    /// The `security` of an operation that needs the bearer token.
    pub fn secured() -> Value {
        json!([{"bearer": []}])
    }

    /// Adds `paths` (an object of path items) to the document `doc`.
    pub fn add_paths(doc: &mut Value, paths: Value) {
        if let (Some(all), Value::Object(new)) = (doc["paths"].as_object_mut(), paths) {
            all.extend(new);
        }
    }
}

/// The OpenAPI 3.1 document of the platform's routes and `app`'s modules'.
pub(crate) fn openapi_document(app: &App) -> Value {
    use openapi::{err, ok};
    let secured = openapi::secured();
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
    for m in &app.modules {
        m.openapi(&mut doc);
    }
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

async fn openapi_route(State(ctx): State<Ctx>) -> Json<Value> {
    Json(openapi_document(&ctx.app))
}

#[cfg(test)]
mod tests {
    use super::*;

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
