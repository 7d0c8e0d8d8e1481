//! The whole log over HTTP, for clients in any language: ordered pages
//! (`GET /v1/events`) and a live feed as Server-Sent Events
//! (`GET /v1/events/live`), each event with its position, its stream, its
//! CloudEvents attributes and its data.
//!
//! A page ends with `next`, the position to pass as `after` to continue; a
//! live feed gives each event `id: <position>`, so a reconnecting client
//! (`Last-Event-ID`) continues right after the last event it saw, with no
//! gap and no duplicate. A live client's memory is bounded: events are
//! pulled from the broker as the client reads them (its TCP window is the
//! buffer), never queued for it.

use std::convert::Infallible;

use axum::extract::rejection::QueryRejection;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::Serialize;
use sluice_events::RecordedEvent;

use super::*;

/// Most events in one page.
pub(super) const MAX_PAGE: usize = 1000;
/// Most events a page looks at (filtered by type) before it answers with
/// what it found and a cursor, so a rare type never makes a slow request.
const MAX_SCAN: usize = 10_000;

/// Query of `GET /v1/events` and `GET /v1/events/live`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LogQuery {
    /// Events after this position (default 0: from the start).
    after: Option<u64>,
    /// Only this category (`events.<category>.>`).
    category: Option<String>,
    /// Only this event type.
    #[serde(rename = "type")]
    event_type: Option<String>,
    /// Events per page (1..=1000, default 100).
    limit: Option<usize>,
}

/// One event as the log's pages and feed carry it.
#[derive(Debug, Serialize)]
pub(super) struct LogEvent {
    position: u64,
    stream: String,
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    source: String,
    specversion: &'static str,
    time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlationid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    causationid: Option<String>,
    data: Value,
}

impl From<RecordedEvent> for LogEvent {
    fn from(e: RecordedEvent) -> Self {
        // Data that is not JSON (a raw publisher's) travels as a string.
        let data = serde_json::from_slice(&e.envelope.data).unwrap_or_else(|_| {
            Value::String(String::from_utf8_lossy(&e.envelope.data).into_owned())
        });
        Self {
            position: e.position,
            stream: e.stream_id.to_string(),
            id: e.envelope.id.as_str().to_owned(),
            time: e.envelope.time_rfc3339(),
            event_type: e.envelope.event_type,
            source: e.envelope.source,
            specversion: "1.0",
            correlationid: e.envelope.correlation_id,
            causationid: e.envelope.causation_id,
            data,
        }
    }
}

fn query(q: Result<Query<LogQuery>, QueryRejection>) -> Result<LogQuery, Problem> {
    let Query(q) = q.map_err(|e| Problem::bad_request(e.body_text()))?;
    if let Some(c) = &q.category {
        sluice_events::validate_token("category", c)
            .map_err(|e| Problem::bad_request(e.to_string()))?;
    }
    Ok(q)
}

/// `GET /v1/events?after=&category=&type=&limit=`: `{"events": [...],
/// "next": <position>, "more": bool}`; pass `next` as `after` to continue
/// (`more` is false at the head of the log: poll, or use the live feed).
pub(super) async fn page(
    State(ctx): State<Ctx>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(Problem::bad_request(format!(
            "limit must be 1..={MAX_PAGE}"
        )));
    }
    let after = q.after.unwrap_or(0);
    let mut feed = ctx
        .store
        .read_category(q.category.as_deref(), after.saturating_add(1))
        .await?;
    let (mut events, mut scanned, mut last_seen) = (Vec::new(), 0, None::<u64>);
    let mut more = false;
    while let Some(item) = feed.next().await {
        let e = item?;
        if events.len() == limit || scanned == MAX_SCAN {
            more = true;
            break;
        }
        scanned += 1;
        last_seen = Some(e.position);
        if q.event_type
            .as_deref()
            .is_none_or(|t| t == e.envelope.event_type)
        {
            events.push(LogEvent::from(e));
        }
    }
    // The cursor moves past everything scanned, also what the type filter
    // left out, so a filtered follower never scans the same events again.
    Ok(Json(json!({
        "events": events,
        "next": last_seen.unwrap_or(after),
        "more": more,
    })))
}

/// `GET /v1/events/live?category=&type=&after=`: every event from `after`
/// (or right after `Last-Event-ID`, or only new ones) as it is appended.
pub(super) async fn live(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, Problem> {
    let q = query(q)?;
    let resume = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    Problem::bad_request("Last-Event-ID must be a position (an integer)")
                })?,
        ),
        None => q.after,
    };
    let filter = match &q.category {
        Some(c) => format!("{}.{c}.>", ctx.store.config().subject_prefix),
        None => format!("{}.>", ctx.store.config().subject_prefix),
    };
    let feed = ctx
        .store
        .subscribe(&filter, resume.map(|p| p.saturating_add(1)))
        .await?;
    let wanted = q.event_type;
    let events = feed.filter_map(move |item| {
        let wanted = wanted.clone();
        async move {
            match item {
                Ok(e) if wanted.as_deref().is_none_or(|t| t == e.envelope.event_type) => {
                    let position = e.position;
                    let body = serde_json::to_string(&LogEvent::from(e)).ok()?;
                    Some(Ok(SseEvent::default().id(position.to_string()).data(body)))
                }
                Ok(_) => None,
                // A stored event that cannot be read: say so in the feed
                // (clients see it) and go on; the log is not blocked.
                Err(e) => Some(Ok(SseEvent::default().event("error").data(e.to_string()))),
            }
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
