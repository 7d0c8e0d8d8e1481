//! The dashboard at `/ui`: overview, streams, the log, dead letters,
//! consumers, projections and sagas, embedded in the binary.
//!
//! Approach: every page is a small server-rendered HTML shell (title,
//! navigation, an empty `<main>`) plus one CSS file and one plain-JS module,
//! both compiled in with `include_str!` (no CDN, no Node build). The module
//! fills the page from the same JSON routes the API serves (`/v1/...`, and
//! `/ui/data/overview` for the stream state and durability warnings), so the
//! dashboard shows exactly what clients see, and polls them for live
//! numbers and its SVG charts. Why not render the data on the server: a
//! browser cannot add `Authorization` to a navigation, so on a deployment
//! without `open_reads` a server-rendered page would need cookies (and CSRF
//! protection); here the shells carry no data and are served without a
//! token, and the module sends `Authorization: Bearer` (kept in
//! `sessionStorage`, asked for once) on every call, reads included when the
//! deployment wants them. Every value reaches the page through `escape()`
//! (the module's and [`escape`] here for the URL parts of a shell).
//!
//! The operator routes the pages needed and the API lacked live here too:
//! `POST|GET /v1/projections/{name}/rebuild` (a blue/green rebuild in a
//! task, and its progress), `GET /v1/consumers` and
//! `POST /v1/consumers/{name}/pause|resume` (the CLI's `consumer` commands).

use super::*;

const CSS: &str = include_str!("ui/ui.css");
const JS: &str = include_str!("ui/ui.js");

/// The pages and the navigation's labels.
const NAV: [(&str, &str); 7] = [
    ("/ui", "Overview"),
    ("/ui/streams", "Streams"),
    ("/ui/events", "Events"),
    ("/ui/dlq", "Dead letters"),
    ("/ui/consumers", "Consumers"),
    ("/ui/projections", "Projections"),
    ("/ui/sagas", "Sagas"),
];

/// The pages' shells and assets: served without a token (they carry no
/// data), so merged outside the read-token layer.
pub(super) fn shells() -> Router {
    Router::new()
        .route("/ui", get(|| page("overview", "/ui", &[])))
        .route("/ui/", get(|| page("overview", "/ui", &[])))
        .route("/ui/streams", get(|| page("streams", "/ui/streams", &[])))
        .route(
            "/ui/streams/{category}/{id}",
            get(|UrlPath((c, i)): UrlPath<(String, String)>| async move {
                page("stream", "/ui/streams", &[("category", &c), ("id", &i)]).await
            }),
        )
        .route("/ui/events", get(|| page("events", "/ui/events", &[])))
        .route("/ui/dlq", get(|| page("dlq", "/ui/dlq", &[])))
        .route(
            "/ui/consumers",
            get(|| page("consumers", "/ui/consumers", &[])),
        )
        .route(
            "/ui/projections",
            get(|| page("projections", "/ui/projections", &[])),
        )
        .route("/ui/sagas", get(|| page("sagas", "/ui/sagas", &[])))
        .route(
            "/ui/sagas/{name}/{id}",
            get(|UrlPath((n, i)): UrlPath<(String, String)>| async move {
                page("saga", "/ui/sagas", &[("saga", &n), ("id", &i)]).await
            }),
        )
        .route("/ui/static/ui.css", get(|| asset(CSS, "text/css")))
        .route(
            "/ui/static/ui.js",
            get(|| asset(JS, "text/javascript; charset=utf-8")),
        )
}

/// The dashboard's data routes that no JSON route serves yet: reads, so
/// behind the read token when reads are closed.
pub(super) fn data() -> Router<Ctx> {
    Router::new().route("/ui/data/overview", get(overview))
}

/// HTML-escapes `s` for text and attribute values.
pub(super) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn page(name: &str, current: &str, args: &[(&str, &str)]) -> Response {
    let nav: String = NAV
        .iter()
        .map(|(href, label)| {
            let cls = if *href == current {
                " class=\"current\""
            } else {
                ""
            };
            format!("<a href=\"{href}\"{cls}>{label}</a>")
        })
        .collect();
    let data: String = args
        .iter()
        .map(|(k, v)| format!(" data-{k}=\"{}\"", escape(v)))
        .collect();
    let title = NAV
        .iter()
        .find(|(h, _)| *h == current)
        .map_or("Sluice", |(_, l)| l);
    let version = env!("CARGO_PKG_VERSION");
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{title} · Sluice</title><link rel=\"stylesheet\" href=\"/ui/static/ui.css\"></head>\
<body data-page=\"{name}\"{data}><header><strong>Sluice</strong> <small>{version}</small><nav>{nav}</nav>\
<button id=\"token\" type=\"button\">Token</button></header><main id=\"main\"><p>Loading…</p></main>\
<script type=\"module\" src=\"/ui/static/ui.js\"></script></body></html>"
    );
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        html,
    )
        .into_response()
}

/// The server, the stream and the durability warnings `sluice status`
/// gives (what a client can see of them: the server's fsync policy is not
/// visible over the client protocol).
async fn overview(State(ctx): State<Ctx>) -> Response {
    let state = match ctx.store.stream_state().await {
        Ok(s) => s,
        Err(e) => return Problem::from(e).into_response(),
    };
    let info = ctx.store.server_info();
    let warnings = state.durability_warnings(
        ctx.sync_always,
        ctx.production,
        ctx.store.config().retry_horizon(),
    );
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "server": {"version": info.version, "name": info.server_name},
        "stream": {
            "name": ctx.store.config().stream,
            "events": state.messages,
            "bytes": state.bytes,
            "first_position": state.first_position,
            "last_position": state.last_position,
            "aggregates": state.aggregates,
            "replicas": state.replicas,
        },
        "warnings": warnings,
    }))
    .into_response()
}

/// Where the rebuild a `POST /v1/projections/{name}/rebuild` started
/// stands, per projection, for `GET` on the same path (one process's
/// rebuilds: the read store's `rebuild_position` in the projection's
/// status says where any rebuild is).
#[derive(Debug, Clone, serde::Serialize)]
pub(super) struct RebuildState {
    projection: String,
    /// `running`, `done` or `failed`.
    state: &'static str,
    position: u64,
    target: u64,
    percent: f64,
    events_per_second: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn rebuilds() -> &'static std::sync::Mutex<std::collections::BTreeMap<String, RebuildState>> {
    static REBUILDS: OnceLock<std::sync::Mutex<std::collections::BTreeMap<String, RebuildState>>> =
        OnceLock::new();
    REBUILDS.get_or_init(Default::default)
}

fn set_rebuild(state: RebuildState) {
    if let Ok(mut all) = rebuilds().lock() {
        all.insert(state.projection.clone(), state);
    }
}

fn rebuild_of(name: &str) -> Option<RebuildState> {
    rebuilds().lock().ok()?.get(name).cloned()
}

/// `POST /v1/projections/{name}/rebuild`: starts a blue/green rebuild of
/// one projection in a task (202); 409 while one runs.
pub(super) async fn start_rebuild(
    State(ctx): State<Ctx>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    let Ok(projection) = ctx.app.projection(&name) else {
        return Problem::not_found(format!(
            "no projection named {:?}",
            name.chars().take(64).collect::<String>()
        ))
        .into_response();
    };
    let Some(db) = ctx.db.clone() else {
        return no_read_store(&name);
    };
    if rebuild_of(&name).is_some_and(|r| r.state == "running") {
        return problem(
            StatusCode::CONFLICT,
            "rebuild-running",
            "A rebuild is running",
            format!(
                "projection {name} is being rebuilt: follow it at GET /v1/projections/{name}/rebuild"
            ),
        );
    }
    let member = projection.member().clone();
    let running = RebuildState {
        projection: name.clone(),
        state: "running",
        position: 0,
        target: 0,
        percent: 0.0,
        events_per_second: 0.0,
        error: None,
    };
    set_rebuild(running.clone());
    let store = ctx.store.clone();
    let task_name = name.clone();
    tokio::spawn(
        async move {
            let last = std::sync::Arc::new(std::sync::Mutex::new(running));
            let seen = last.clone();
            let done = sluice_projections::rebuild_group(
                vec![member],
                db,
                store,
                sluice_projections::RunnerConfig::default(),
                move |p: &sluice_projections::RebuildProgress| {
                    let state = RebuildState {
                        projection: task_name.clone(),
                        state: "running",
                        position: p.position,
                        target: p.target,
                        percent: percent(p.position, p.target),
                        events_per_second: p.events_per_second,
                        error: None,
                    };
                    if let Ok(mut l) = seen.lock() {
                        *l = state.clone();
                    }
                    set_rebuild(state);
                },
                CancellationToken::new(),
            )
            .await;
            let mut end = last.lock().map(|l| l.clone()).unwrap_or_else(|e| e.into_inner().clone());
            match done {
                Ok(Some(report)) => {
                    end.state = "done";
                    end.position = report.position;
                    end.target = end.target.max(report.position);
                    end.percent = 100.0;
                    end.events_per_second = report.events_per_second;
                    tracing::info!(projection = %end.projection, position = report.position, "rebuild done");
                }
                Ok(None) => {
                    end.state = "failed";
                    end.error = Some("interrupted; start it again to resume".to_owned());
                }
                Err(e) => {
                    tracing::warn!(projection = %end.projection, error = %e, "rebuild failed");
                    end.state = "failed";
                    end.error = Some(e.to_string());
                }
            }
            set_rebuild(end);
        }
        .in_current_span(),
    );
    (StatusCode::ACCEPTED, Json(rebuild_of(&name))).into_response()
}

/// `GET /v1/projections/{name}/rebuild`: the last rebuild this process
/// started of it (404 when none).
pub(super) async fn rebuild_progress(UrlPath(name): UrlPath<String>) -> Response {
    match rebuild_of(&name) {
        Some(r) => Json(r).into_response(),
        None => Problem::not_found(format!(
            "no rebuild of {:?} was started here",
            name.chars().take(64).collect::<String>()
        ))
        .into_response(),
    }
}

fn percent(position: u64, target: u64) -> f64 {
    if target == 0 {
        100.0
    } else {
        (100.0 * position as f64 / target as f64).min(100.0)
    }
}

/// `GET /v1/consumers`: every durable consumer with pending, ack-pending,
/// redeliveries, lag and whether it is paused (what `sluice consumer list`
/// prints).
pub(super) async fn consumers_list(State(ctx): State<Ctx>) -> Response {
    match sluice_workers::consumers::list(&ctx.store).await {
        Ok(list) => Json(json!({ "consumers": list })).into_response(),
        Err(e) => consumer_error(e),
    }
}

/// The longest pause (30 days): a consumer is paused to be looked at.
const MAX_PAUSE_SECS: u64 = 30 * 86_400;

#[derive(Debug, Deserialize)]
pub(super) struct PauseBody {
    /// How long the pause lasts unless resumed earlier (default 1 h).
    for_secs: Option<u64>,
}

/// `POST /v1/consumers/{name}/pause`: the kill switch of a consumer, or of
/// every consumer of a worker (`sluice consumer pause`).
pub(super) async fn consumer_pause(
    State(ctx): State<Ctx>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<PauseBody>, JsonRejection>,
) -> Response {
    let secs = match body {
        Ok(Json(b)) => b.for_secs.unwrap_or(3600),
        Err(JsonRejection::MissingJsonContentType(_)) => 3600,
        Err(e) => {
            return bad_request(format!(
                "the body must be {{\"for_secs\": n}}: {}",
                e.body_text()
            ));
        }
    };
    if !(1..=MAX_PAUSE_SECS).contains(&secs) {
        return bad_request(format!("for_secs must be between 1 and {MAX_PAUSE_SECS}"));
    }
    let duration = Duration::from_secs(secs);
    match sluice_workers::consumers::pause(&ctx.store, &name, duration).await {
        Ok(paused) => Json(json!({ "paused": paused, "for_secs": secs })).into_response(),
        Err(e) => consumer_error(e),
    }
}

/// `POST /v1/consumers/{name}/resume` (`sluice consumer resume`).
pub(super) async fn consumer_resume(
    State(ctx): State<Ctx>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    match sluice_workers::consumers::resume(&ctx.store, &name).await {
        Ok(resumed) => Json(json!({ "resumed": resumed })).into_response(),
        Err(e) => consumer_error(e),
    }
}

fn consumer_error(e: sluice_workers::Error) -> Response {
    match e {
        e @ sluice_workers::Error::UnknownConsumer(_) => {
            Problem::not_found(e.to_string()).into_response()
        }
        e @ sluice_workers::Error::InvalidName(_) => bad_request(e.to_string()),
        other => Problem::internal(other).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escape_leaves_no_markup() {
        assert_eq!(
            escape(r#"<img src=x onerror="a('b')">&"#),
            "&lt;img src=x onerror=&quot;a(&#39;b&#39;)&quot;&gt;&amp;"
        );
    }
}
