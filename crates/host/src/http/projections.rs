//! The HTTP query API (axum): projections' status, rows by key and by page,
//! read-your-writes with `min_position`, and an aggregate's events.
//!
//! - `GET /v1/projections` — every projection's status.
//! - `GET /v1/projections/{name}` — one projection's status.
//! - `GET /v1/projections/{name}/rows/{key}` — one row.
//! - `GET /v1/projections/{name}/rows?limit=&after=` — a page of rows in key
//!   order; `next` is the cursor of the following page.
//! - `GET /v1/streams/{category}/{id}?from=&limit=` — an aggregate's events.
//!
//! Row responses carry `ETag: "<checkpoint>"` (the projection's checkpoint
//! read in the same snapshot as the rows; `If-None-Match` answers 304) and
//! `Cache-Control: no-cache` (store, but revalidate). `min_position=<seq>`
//! (or header `Sluice-Min-Position`) waits up to the configured timeout for
//! the checkpoint to reach `<seq>`, else answers 503 with `Retry-After`.
//! Errors are RFC 9457 problem details; internals go to the log only.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sluice_events::{EventStore, StreamId};
use sqlx::AnyConnection;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;

use sluice_projections::{
    Backend, Database, Error, LiveStatus, ProjectionStatus, ReadModel, projection_status,
    read_checkpoint,
};

use super::problem::{Problem, ProblemType, problem_responses};

/// Header alternative to the `min_position` query parameter.
pub const MIN_POSITION_HEADER: &str = "Sluice-Min-Position";
/// Default page size of `rows`.
pub const DEFAULT_LIMIT: u32 = 100;
/// Largest page size of `rows`.
pub const MAX_LIMIT: u32 = 1000;

/// What the handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    store: EventStore,
    db: Database,
    models: BTreeMap<&'static str, (Arc<dyn ReadModel>, Option<LiveStatus>)>,
    wait_timeout: Duration,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("projections", &self.0.models.keys().collect::<Vec<_>>())
            .field("wait_timeout", &self.0.wait_timeout)
            .finish()
    }
}

/// Builds an [`AppState`].
pub struct AppStateBuilder {
    inner: Inner,
}

impl std::fmt::Debug for AppStateBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppStateBuilder").finish_non_exhaustive()
    }
}

impl AppState {
    /// Starts a state over the event store and the read store.
    pub fn builder(store: EventStore, db: Database) -> AppStateBuilder {
        AppStateBuilder {
            inner: Inner {
                store,
                db,
                models: BTreeMap::new(),
                wait_timeout: Duration::from_secs(5),
            },
        }
    }

    /// The read store.
    pub fn db(&self) -> &Database {
        &self.0.db
    }
}

impl AppStateBuilder {
    /// Serves a read model; `live` is its runner's status when the runner
    /// is in this process.
    pub fn read_model(mut self, model: Arc<dyn ReadModel>, live: Option<LiveStatus>) -> Self {
        self.inner.models.insert(model.name(), (model, live));
        self
    }

    /// How long `min_position` waits before answering 503 (default 5 s).
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.inner.wait_timeout = timeout;
        self
    }

    /// The finished state.
    pub fn build(self) -> AppState {
        AppState(Arc::new(self.inner))
    }
}

/// The router, for `serve` and for tests (`tower::ServiceExt::oneshot`).
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/v1/projections", get(list_projections))
        .route("/v1/projections/{name}", get(get_projection))
        .route("/v1/projections/{name}/rows", get(list_rows))
        .route("/v1/projections/{name}/rows/{key}", get(get_row))
        .route("/v1/streams/{category}/{id}", get(get_stream))
        .fallback(|| async {
            Problem::not_found("no such endpoint: see /openapi.json for the routes")
        })
        .with_state(state)
        .layer(middleware::from_fn(problem_responses))
}

/// Serves [`app`] on `addr` until `shutdown` is cancelled. Prints nothing:
/// the caller logs the bound address (returned through `bound`).
pub async fn serve(
    addr: SocketAddr,
    state: AppState,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Io { op: "bind", source })?;
    let local = listener
        .local_addr()
        .map_err(|source| Error::Io { op: "bind", source })?;
    tracing::info!(addr = %local, "HTTP API listening");
    if let Some(tx) = bound {
        let _ = tx.send(local);
    }
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|source| Error::Io {
            op: "serve",
            source,
        })
}

#[derive(Serialize)]
struct ProjectionList {
    projections: Vec<ProjectionStatus>,
}

async fn list_projections(State(s): State<AppState>) -> Result<Json<ProjectionList>, Problem> {
    let mut projections = Vec::new();
    for (name, (_, live)) in &s.0.models {
        projections.push(projection_status(&s.0.db, &s.0.store, name, live.as_ref()).await?);
    }
    Ok(Json(ProjectionList { projections }))
}

fn model<'s>(
    s: &'s AppState,
    name: &str,
) -> Result<&'s (Arc<dyn ReadModel>, Option<LiveStatus>), Problem> {
    s.0.models.get(name).ok_or_else(|| {
        Problem::not_found(format!(
            "no projection named {:?}",
            name.chars().take(64).collect::<String>()
        ))
    })
}

async fn get_projection(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ProjectionStatus>, Problem> {
    let (m, live) = model(&s, &name)?;
    Ok(Json(
        projection_status(&s.0.db, &s.0.store, m.name(), live.as_ref()).await?,
    ))
}

#[derive(Debug, Deserialize)]
struct RowsQuery {
    limit: Option<u32>,
    after: Option<String>,
    min_position: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct RowQuery {
    min_position: Option<u64>,
}

#[derive(Serialize)]
struct RowsPage {
    rows: Vec<serde_json::Value>,
    next: Option<String>,
    checkpoint: u64,
}

fn min_position(query: Option<u64>, headers: &HeaderMap) -> Result<Option<u64>, Problem> {
    if query.is_some() {
        return Ok(query);
    }
    match headers.get(MIN_POSITION_HEADER) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| {
                Problem::bad_request(format!("{MIN_POSITION_HEADER} must be a stream sequence"))
            }),
    }
}

/// Read-your-writes: waits for the checkpoint to reach `min`, polling the
/// database (so it also works when the projector runs in another process).
async fn wait_for(s: &AppState, name: &str, min: Option<u64>) -> Result<(), Problem> {
    let Some(min) = min else { return Ok(()) };
    let deadline = tokio::time::Instant::now() + s.0.wait_timeout;
    loop {
        if read_checkpoint(&s.0.db, name).await? >= min {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Problem::of(
                ProblemType::NotCaughtUp,
                format!("projection {name} has not reached position {min} yet"),
            )
            .with_retry_after(1));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `f` in a read transaction together with the checkpoint, so the
/// ETag and the rows come from one snapshot.
async fn snapshot<T>(
    s: &AppState,
    name: &'static str,
    f: impl for<'c> FnOnce(
        &'c mut AnyConnection,
    ) -> futures::future::BoxFuture<'c, Result<T, sqlx::Error>>,
) -> Result<(u64, T), Problem> {
    use sqlx::Row;
    let mut tx = s.0.db.pool().begin().await?;
    if s.0.db.backend() == Backend::Postgres {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
    }
    let checkpoint = sqlx::query("SELECT position FROM sluice_checkpoints WHERE projection = $1")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.try_get::<i64, _>(0))
        .transpose()?
        .map_or(0, to_u64);
    let value = f(&mut tx).await?;
    tx.commit().await?;
    Ok((checkpoint, value))
}

fn cached(checkpoint: u64, headers: &HeaderMap, body: impl Serialize) -> Response {
    let etag = format!("\"{checkpoint}\"");
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut resp = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        Json(body).into_response()
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    // Rows change with every event: caches may keep them but must
    // revalidate, which the ETag makes cheap.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

async fn get_row(
    State(s): State<AppState>,
    Path((name, key)): Path<(String, String)>,
    q: Result<Query<RowQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let Query(q) = q.map_err(|e| Problem::bad_request(e.body_text()))?;
    let (m, _) = model(&s, &name)?;
    let m = m.clone();
    wait_for(&s, m.name(), min_position(q.min_position, &headers)?).await?;
    let key_ref = key.clone();
    let (checkpoint, row) = snapshot(&s, m.name(), move |conn| {
        Box::pin(async move { m.get(conn, &key_ref).await })
    })
    .await?;
    match row {
        Some(row) => {
            let parked = match s
                .0
                .models
                .get(name.as_str())
                .and_then(|(m, _)| m.stream_of(&key))
            {
                Some(stream) => parked_behind(&s, &name, &stream).await?,
                None => None,
            };
            let mut resp = cached(checkpoint, &headers, row);
            if let Some(position) = parked {
                // The row stops at the aggregate's dead letter: stale until
                // the cause is fixed (redrive) or the event voided.
                resp.headers_mut()
                    .insert(PARKED_BEHIND, HeaderValue::from(position));
            }
            Ok(resp)
        }
        None => Err(Problem::not_found(format!(
            "no row with key {:?} in {name}",
            key.chars().take(128).collect::<String>()
        ))),
    }
}

/// Response header of a row whose aggregate is parked for the projection:
/// the position of the dead letter it waits behind (the row is stale).
pub const PARKED_BEHIND: &str = "sluice-parked-behind";

/// The position `stream` is parked behind for `projection`, if parked.
async fn parked_behind(
    s: &AppState,
    projection: &str,
    stream: &StreamId,
) -> Result<Option<u64>, Problem> {
    let row: Option<i64> = sqlx::query_scalar(
        "SELECT behind_position FROM sluice_parked WHERE projection = $1 AND stream = $2",
    )
    .bind(projection)
    .bind(stream.to_string())
    .fetch_optional(s.0.db.pool())
    .await
    .map_err(Problem::internal)?;
    Ok(row.map(|p| u64::try_from(p).unwrap_or(0)))
}

async fn list_rows(
    State(s): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<RowsQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let Query(q) = q.map_err(|e| Problem::bad_request(e.body_text()))?;
    let (m, _) = model(&s, &name)?;
    let m = m.clone();
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(Problem::bad_request(format!(
            "limit must be 1..={MAX_LIMIT}"
        )));
    }
    wait_for(&s, m.name(), min_position(q.min_position, &headers)?).await?;
    let after = q.after.clone();
    let (checkpoint, page) = snapshot(&s, m.name(), move |conn| {
        Box::pin(async move { m.list(conn, after.as_deref(), limit).await })
    })
    .await?;
    Ok(cached(
        checkpoint,
        &headers,
        RowsPage {
            rows: page.rows,
            next: page.next,
            checkpoint,
        },
    ))
}

#[derive(Debug, Deserialize)]
struct StreamQuery {
    from: Option<u64>,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct StreamEvent {
    position: u64,
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    source: String,
    time: Option<String>,
    data: serde_json::Value,
}

#[derive(Serialize)]
struct StreamEvents {
    stream: String,
    events: Vec<StreamEvent>,
    next: Option<u64>,
}

async fn get_stream(
    State(s): State<AppState>,
    Path((category, id)): Path<(String, String)>,
    q: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Json<StreamEvents>, Problem> {
    let Query(q) = q.map_err(|e| Problem::bad_request(e.body_text()))?;
    let stream_id = StreamId::new(category, id).map_err(|e| Problem::bad_request(e.to_string()))?;
    let limit = q.limit.unwrap_or(1000);
    if limit == 0 || limit > 10_000 {
        return Err(Problem::bad_request("limit must be 1..=10000"));
    }
    let mut feed =
        s.0.store
            .read(&stream_id, q.from.unwrap_or(1))
            .await
            .map_err(Problem::from)?;
    let mut events = Vec::new();
    let mut next = None;
    while let Some(item) = feed.next().await {
        let e = item.map_err(Problem::from)?;
        if events.len() == limit {
            next = Some(e.position);
            break;
        }
        let data = serde_json::from_slice(&e.envelope.data).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&e.envelope.data).into_owned())
        });
        events.push(StreamEvent {
            position: e.position,
            id: e.envelope.id.as_str().to_owned(),
            event_type: e.envelope.event_type.clone(),
            source: e.envelope.source.clone(),
            time: e.envelope.time.and_then(|t| t.format(&Rfc3339).ok()),
            data,
        });
    }
    if events.is_empty() && q.from.is_none() {
        return Err(Problem::not_found(format!(
            "stream {stream_id} has no events"
        )));
    }
    Ok(Json(StreamEvents {
        stream: stream_id.to_string(),
        events,
        next,
    }))
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[cfg(test)]
mod tests;
