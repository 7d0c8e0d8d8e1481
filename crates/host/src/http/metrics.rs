//! Prometheus metrics: the recorder, per-route request metrics, `/metrics`.

use super::*;

/// A metric's kind, as Prometheus names it in `# TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only ever goes up; its name ends in `_total`.
    Counter,
    /// A value read at scrape time.
    Gauge,
    /// Durations in seconds, in [`DURATION_BUCKETS`].
    Histogram,
}

impl MetricKind {
    /// The `# TYPE` word.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// One metric the platform exports: its name, kind, labels and `# HELP`.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Its name.
    pub name: &'static str,
    /// Its kind.
    pub kind: MetricKind,
    /// Its labels, comma-separated (empty: none).
    pub labels: &'static str,
    /// What it measures (the `# HELP` text).
    pub help: &'static str,
}

const fn m(
    name: &'static str,
    kind: MetricKind,
    labels: &'static str,
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind,
        labels,
        help,
    }
}

/// Every metric the platform exports, in one place: the recorder describes
/// them (`# HELP`, `# TYPE`), `docs/operations.md` lists exactly these (a
/// test compares the two) and `deploy/grafana/sluice.json` is built on them.
pub const METRICS: &[Metric] = {
    use MetricKind::{Counter, Gauge, Histogram};
    &[
        m(
            "sluice_http_requests_total",
            Counter,
            "route,method,status",
            "HTTP requests answered, by route template, method and status.",
        ),
        m(
            "sluice_http_request_duration_seconds",
            Histogram,
            "route,method",
            "Time to answer an HTTP request.",
        ),
        m(
            "sluice_http_connections_refused_total",
            Counter,
            "",
            "HTTP connections refused because the connection cap was reached.",
        ),
        m(
            "sluice_http_connections_timed_out_total",
            Counter,
            "",
            "HTTP connections closed by the header-read or idle timeout.",
        ),
        m(
            "sluice_appends_total",
            Counter,
            "outcome",
            "Appends to the event log by outcome (ok, conflict, invalid, error).",
        ),
        m(
            "sluice_append_duration_seconds",
            Histogram,
            "",
            "Time of an append, from the call to the broker's acknowledgement.",
        ),
        m(
            "sluice_stream_last_position",
            Gauge,
            "",
            "Position (stream sequence) of the last event in the log.",
        ),
        m("sluice_stream_events", Gauge, "", "Events in the log."),
        m(
            "sluice_group_commit_batches_total",
            Counter,
            "",
            "Atomic batches written by group commit.",
        ),
        m(
            "sluice_group_commit_events_total",
            Counter,
            "",
            "Events written through group commit.",
        ),
        m(
            "sluice_group_commit_fsyncs_saved_total",
            Counter,
            "",
            "Appends that shared a batch (and its fsync) with others.",
        ),
        m(
            "sluice_group_commit_conflicts_resolved_total",
            Counter,
            "",
            "Expected-version conflicts inside a batch resolved by retrying the losers alone.",
        ),
        m(
            "sluice_projection_checkpoint",
            Gauge,
            "projection",
            "Last position a projection applied (running in this process).",
        ),
        m(
            "sluice_projection_lag_events",
            Gauge,
            "projection",
            "Events in the log a projection has not applied yet.",
        ),
        m(
            "sluice_projection_lag_seconds",
            Gauge,
            "projection",
            "Age of the oldest event a projection has not applied yet.",
        ),
        m(
            "sluice_projection_halted",
            Gauge,
            "projection",
            "1 while a projection is halted (see /readyz for why).",
        ),
        m(
            "sluice_handler_outcomes_total",
            Counter,
            "worker,outcome",
            "Deliveries handled by a worker, by outcome (ok, retry, dead_letter).",
        ),
        m(
            "sluice_late_redeliveries_total",
            Counter,
            "worker",
            "Events redelivered after a restart once a later event of their aggregate was handled.",
        ),
        m(
            "sluice_worker_halted",
            Gauge,
            "worker",
            "1 while a worker cannot dead-letter and has stopped taking work.",
        ),
        m(
            "sluice_dlq_depth",
            Gauge,
            "consumer,category",
            "Dead letters waiting, by consumer and category.",
        ),
        m(
            "sluice_sagas",
            Gauge,
            "saga,state",
            "Saga instances by state (pending, completed, compensated, needs_attention, abandoned).",
        ),
        m(
            "sluice_nats_connected",
            Gauge,
            "",
            "1 while the NATS connection is up.",
        ),
        m(
            "sluice_nats_connects_total",
            Counter,
            "",
            "NATS (re)connections.",
        ),
        m(
            "sluice_nats_disconnects_total",
            Counter,
            "",
            "NATS disconnections.",
        ),
    ]
};

/// Buckets of every duration histogram, in seconds: from a fast append on
/// a local disk (sub-millisecond) to a read-your-writes wait or a slow
/// fsync on a replicated stream.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process-wide Prometheus recorder (installed once): durations as
/// histograms over [`DURATION_BUCKETS`], every metric of [`METRICS`]
/// described.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = match builder.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Suffix("_seconds".to_owned()),
                DURATION_BUCKETS,
            ) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "histogram buckets refused; durations are summaries");
                    PrometheusBuilder::new()
                }
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if ::metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            for d in METRICS {
                match d.kind {
                    MetricKind::Counter => ::metrics::describe_counter!(d.name, d.help),
                    MetricKind::Gauge => ::metrics::describe_gauge!(d.name, d.help),
                    MetricKind::Histogram => ::metrics::describe_histogram!(d.name, d.help),
                }
            }
            handle
        })
        .clone()
}

/// Metrics and the server span of every request. The span continues an
/// incoming W3C `traceparent` header, else starts a trace; events appended
/// while handling the request carry its context in `ce-traceparent`.
pub(super) async fn record_metrics(req: Request, next: Next) -> Response {
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
    ::metrics::counter!("sluice_http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status)
        .increment(1);
    ::metrics::histogram!("sluice_http_request_duration_seconds", "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    resp
}

pub(super) async fn prometheus(State(ctx): State<Ctx>) -> Response {
    // Gauges read at scrape time, from the sources of truth.
    if let Ok(state) = ctx.store.stream_state().await {
        ::metrics::gauge!("sluice_stream_last_position").set(state.last_position as f64);
        ::metrics::gauge!("sluice_stream_events").set(state.messages as f64);
        for (name, live) in &ctx.live {
            let snap = live.snapshot();
            ::metrics::gauge!("sluice_projection_checkpoint", "projection" => *name)
                .set(snap.checkpoint as f64);
            ::metrics::gauge!("sluice_projection_lag_events", "projection" => *name)
                .set(state.last_position.saturating_sub(snap.checkpoint) as f64);
            if let Some(db) = &ctx.db
                && let Ok(st) =
                    sluice_projections::projection_status(db, &ctx.store, name, Some(live)).await
            {
                ::metrics::gauge!("sluice_projection_lag_seconds", "projection" => *name)
                    .set(st.lag_seconds);
            }
            ::metrics::gauge!("sluice_projection_halted", "projection" => *name)
                .set(if snap.halted.is_some() { 1.0 } else { 0.0 });
        }
    }
    let gc = ctx.store.group_commit_stats();
    // Cumulative counts kept by the store: exported as counters.
    ::metrics::counter!("sluice_group_commit_batches_total").absolute(gc.batches);
    ::metrics::counter!("sluice_group_commit_events_total").absolute(gc.events);
    ::metrics::counter!("sluice_group_commit_fsyncs_saved_total").absolute(gc.fsyncs_saved);
    ::metrics::counter!("sluice_group_commit_conflicts_resolved_total")
        .absolute(gc.conflicts_resolved);
    if let Ok(listing) = sluice_workers::dlq::list(&ctx.store, &Filter::default()).await {
        let now: std::collections::BTreeSet<(String, String)> = listing
            .groups
            .iter()
            .map(|g| (g.consumer.clone(), g.category.clone()))
            .collect();
        for g in &listing.groups {
            ::metrics::gauge!("sluice_dlq_depth", "consumer" => g.consumer.clone(), "category" => g.category.clone())
                .set(g.count as f64);
        }
        // A group whose dead letters were all redriven or discarded is not
        // in the listing any more: its gauge goes back to 0, not stale.
        let mut seen = ctx
            .dlq_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (consumer, category) in seen.difference(&now) {
            ::metrics::gauge!("sluice_dlq_depth", "consumer" => consumer.clone(), "category" => category.clone())
                .set(0.0);
        }
        seen.extend(now);
    }
    if let Some(db) = &ctx.db {
        for m in &ctx.app.modules {
            m.refresh_metrics(db).await;
        }
    }
    ::metrics::gauge!("sluice_nats_connected").set(if ctx.store.is_connected() {
        1.0
    } else {
        0.0
    });
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ctx.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_file(path: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(path);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn names_follow_the_prometheus_conventions() {
        let mut seen = std::collections::BTreeSet::new();
        for d in METRICS {
            assert!(seen.insert(d.name), "{} listed twice", d.name);
            assert!(d.name.starts_with("sluice_"), "{}", d.name);
            assert!(!d.help.is_empty(), "{} has no help", d.name);
            match d.kind {
                MetricKind::Counter => assert!(d.name.ends_with("_total"), "{}", d.name),
                MetricKind::Histogram => assert!(d.name.ends_with("_seconds"), "{}", d.name),
                MetricKind::Gauge => assert!(!d.name.ends_with("_total"), "{}", d.name),
            }
        }
    }

    /// docs/operations.md lists exactly the exported metrics, with their
    /// kinds and labels.
    #[test]
    fn the_operations_guide_lists_exactly_these_metrics() {
        let doc = repo_file("docs/operations.md");
        let table = doc
            .split("<!-- metrics:begin -->")
            .nth(1)
            .and_then(|t| t.split("<!-- metrics:end -->").next())
            .expect("the metrics table markers in docs/operations.md");
        let documented: Vec<(String, String, String)> = table
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let labels = cells[3].replace(['`', ' '], "");
                (
                    cells[1].trim_matches('`').to_owned(),
                    cells[2].to_owned(),
                    labels,
                )
            })
            .collect();
        let exported: Vec<(String, String, String)> = METRICS
            .iter()
            .map(|d| {
                (
                    d.name.to_owned(),
                    d.kind.as_str().to_owned(),
                    d.labels.to_owned(),
                )
            })
            .collect();
        assert_eq!(documented, exported);
    }

    /// The Grafana dashboard queries only metrics that exist (histograms
    /// through their `_bucket` series).
    #[test]
    fn the_grafana_dashboard_uses_only_exported_metrics() {
        let dash: serde_json::Value =
            serde_json::from_str(&repo_file("deploy/grafana/sluice.json")).unwrap();
        let mut used = 0;
        for panel in dash["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if !word.starts_with("sluice_") {
                        continue;
                    }
                    used += 1;
                    let known = METRICS.iter().any(|d| {
                        d.name == word
                            || (d.kind == MetricKind::Histogram
                                && word.strip_suffix("_bucket") == Some(d.name))
                    });
                    assert!(known, "panel {:?} queries unknown {word}", panel["title"]);
                }
            }
        }
        assert!(used >= 10, "the dashboard queries {used} metrics");
    }
}
