//! The HTTP API as served by the binary: the projections' query API plus
//! appends, dead-letter operations, health, readiness, metrics and the
//! OpenAPI document, behind bearer-token authentication for everything that
//! changes state or touches dead letters, per-client rate limiting, body size
//! limits and timeouts. CORS is off unless origins are configured. Every
//! error is an RFC 9457 problem (see [`mod@problem`]). A module's routes use
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
use sluice_workers::dlq::{Filter, RedriveTarget};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tower_http::cors::CorsLayer;

use crate::module::{App, RouteContext};
use crate::tokens::{ALL_SCOPES, Scope};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tracing::Instrument;

mod auth;
mod conn;
mod dlq;
mod health;
mod log;
mod metrics;
pub mod openapi;
pub mod problem;
mod projections;
mod rate_limit;
mod sagas;
mod streams;
mod tls;
mod ui;

pub use auth::load_or_create_token;
pub use metrics::{DURATION_BUCKETS, METRICS, Metric, MetricKind, metrics_handle};
pub use sagas::saga_error;
pub use streams::{
    IDEMPOTENT_REPLAYED, Object, ObjectBody, bad_request, idempotency_key, key_reused, object_body,
    problem,
};

use auth::*;
use dlq::*;
use health::*;
use metrics::*;
use openapi::*;
use rate_limit::*;
use streams::*;

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
    /// Whether the server is known to fsync every write (`Some(true)` on
    /// the embedded server `up` starts); `None`: clients cannot tell.
    pub sync_always: Option<bool>,
    /// Production (`serve`): the durability warnings of the overview are
    /// those of a production deployment.
    pub production: bool,
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
            sync_always: None,
            production: false,
        }
    }
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
    sync_always: Option<bool>,
    production: bool,
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
        sync_always: opts.sync_always,
        production: opts.production,
        dlq_seen: Arc::default(),
    };
    let protected = Router::new()
        .route("/v1/streams/{category}/{id}", post(append))
        .route("/v1/dlq", get(dlq_list))
        .route("/v1/dlq/{id}", get(dlq_show))
        .route("/v1/dlq/{id}/redrive", post(dlq_redrive))
        .route("/v1/dlq/{id}/discard", post(dlq_discard))
        .route("/v1/events/{position}/void", post(void_event))
        .route(
            "/v1/projections/{name}/rebuild",
            post(ui::start_rebuild).get(ui::rebuild_progress),
        )
        .route("/v1/consumers/{name}/pause", post(ui::consumer_pause))
        .route("/v1/consumers/{name}/resume", post(ui::consumer_resume))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), require_token));
    let open = Router::new()
        .route("/v1/events", get(log::page))
        .route("/v1/events/live", get(log::live))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
        .route("/openapi.json", get(openapi_route))
        .route("/v1/consumers", get(ui::consumers_list))
        .merge(ui::data());
    // A module's routes: reads as the query API's, anything else behind
    // the token with the scope its method and path need.
    let modules = if parts.routes.has_routes() {
        parts.routes.route_layer(middleware::from_fn_with_state(
            ctx.clone(),
            require_token_for_writes,
        ))
    } else {
        // A layer on no routes is refused by axum (an app of modules
        // without routes is fine).
        parts.routes
    };
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
    // The dashboard's pages carry no data (their script reads the API
    // with the token): outside the read-token layer.
    let mut app = app
        .merge(ui::shells())
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
