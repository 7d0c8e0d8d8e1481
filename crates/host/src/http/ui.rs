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
    let info = ctx.store.client().server_info();
    let warnings = state.durability_warnings(None, false, ctx.store.config().retry_horizon());
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
