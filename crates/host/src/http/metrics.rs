//! Prometheus metrics: the recorder, per-route request metrics, `/metrics`.

use super::*;

/// The process-wide Prometheus recorder (installed once).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if ::metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
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
    ::metrics::gauge!("sluice_group_commit_batches").set(gc.batches as f64);
    ::metrics::gauge!("sluice_group_commit_events").set(gc.events as f64);
    ::metrics::gauge!("sluice_group_commit_fsyncs_saved").set(gc.fsyncs_saved as f64);
    ::metrics::gauge!("sluice_group_commit_conflicts_resolved").set(gc.conflicts_resolved as f64);
    if let Ok(listing) = sluice_workers::dlq::list(ctx.store.jetstream(), &Filter::default()).await
    {
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
    ::metrics::gauge!("sluice_nats_connected").set(
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
