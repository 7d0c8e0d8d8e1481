//! RFC 9457 problem details: the one shape of every error the HTTP API
//! answers, whichever layer produced it.
//!
//! Handlers answer a [`Problem`] built from a [`ProblemType`] (status, title
//! and the stable `type` URI in one place). What axum, hyper's layers or
//! tower-http answer on their own (unknown routes, 405, 408, 413, 415, path
//! and query rejections) is rewritten into the same shape by
//! [`problem_responses`], so no error leaves the server as plain text or an
//! empty body. [`json_rejection`] maps a `Json` extractor's rejection onto
//! the right status (400 for a malformed or wrongly shaped body, 413, 415).

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Body;
use axum::extract::Request;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Where the problem `type` URIs live; the slug is appended.
pub const PROBLEM_BASE: &str = "https://sluice.invalid/problems/";

/// The kinds of problem the API answers. Each has a stable `type` URI
/// (`PROBLEM_BASE` + slug), a status and a title; clients branch on the
/// `type`, never on the `detail` text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemType {
    /// Malformed request: bad JSON, wrong body shape, invalid id or parameter.
    BadRequest,
    /// No or wrong bearer token.
    Unauthorized,
    /// No such route or resource.
    NotFound,
    /// The route exists, not with this method (`Allow` says which).
    MethodNotAllowed,
    /// The request took longer than the configured timeout.
    RequestTimeout,
    /// Optimistic concurrency or state conflict: reload and retry.
    Conflict,
    /// The body exceeds the configured limit.
    PayloadTooLarge,
    /// The body is not `application/json`.
    UnsupportedMediaType,
    /// A domain rule refused the command (the problem's `rule` names it).
    Rejected,
    /// An `Idempotency-Key` was used before for a different request.
    IdempotencyKeyReused,
    /// Too many requests from this client.
    RateLimited,
    /// Request headers are too large.
    HeadersTooLarge,
    /// A stored event is invalid (its `position` is given): an operator
    /// voids it, and the aggregate loads again.
    InvalidStoredEvent,
    /// The server failed; the cause is in its log.
    Internal,
    /// A dependency (NATS, the read store) is unavailable: retry later.
    Unavailable,
    /// A projection has not reached the asked `min_position` in time.
    NotCaughtUp,
}

impl ProblemType {
    /// The last segment of the `type` URI.
    pub const fn slug(self) -> &'static str {
        match self {
            Self::BadRequest => "bad-request",
            Self::Unauthorized => "unauthorized",
            Self::NotFound => "not-found",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::RequestTimeout => "request-timeout",
            Self::Conflict => "conflict",
            Self::PayloadTooLarge => "payload-too-large",
            Self::UnsupportedMediaType => "unsupported-media-type",
            Self::Rejected => "rejected",
            Self::IdempotencyKeyReused => "idempotency-key-reused",
            Self::RateLimited => "rate-limited",
            Self::HeadersTooLarge => "headers-too-large",
            Self::InvalidStoredEvent => "invalid-stored-event",
            Self::Internal => "internal",
            Self::Unavailable => "unavailable",
            Self::NotCaughtUp => "not-caught-up",
        }
    }

    /// The HTTP status it is answered with.
    pub const fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Conflict => StatusCode::CONFLICT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Rejected | Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::InvalidStoredEvent => StatusCode::CONFLICT,
            Self::Unavailable | Self::NotCaughtUp => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A short, fixed summary for people.
    pub const fn title(self) -> &'static str {
        match self {
            Self::BadRequest => "Bad request",
            Self::Unauthorized => "Unauthorized",
            Self::NotFound => "Not found",
            Self::MethodNotAllowed => "Method not allowed",
            Self::RequestTimeout => "Request timeout",
            Self::Conflict => "Conflict",
            Self::PayloadTooLarge => "Payload too large",
            Self::UnsupportedMediaType => "Unsupported media type",
            Self::Rejected => "Command refused",
            Self::IdempotencyKeyReused => "Idempotency key reused",
            Self::RateLimited => "Too many requests",
            Self::HeadersTooLarge => "Request headers too large",
            Self::InvalidStoredEvent => "Invalid event in the log",
            Self::Internal => "Internal error",
            Self::Unavailable => "Service unavailable",
            Self::NotCaughtUp => "Projection not caught up",
        }
    }

    /// The kind a bare status stands for, when a layer answered on its own.
    fn for_status(status: StatusCode) -> Option<Self> {
        Some(match status {
            StatusCode::BAD_REQUEST => Self::BadRequest,
            StatusCode::UNAUTHORIZED => Self::Unauthorized,
            StatusCode::NOT_FOUND => Self::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => Self::MethodNotAllowed,
            StatusCode::REQUEST_TIMEOUT => Self::RequestTimeout,
            StatusCode::CONFLICT => Self::Conflict,
            StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self::UnsupportedMediaType,
            StatusCode::TOO_MANY_REQUESTS => Self::RateLimited,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => Self::HeadersTooLarge,
            StatusCode::INTERNAL_SERVER_ERROR => Self::Internal,
            StatusCode::SERVICE_UNAVAILABLE => Self::Unavailable,
            _ => return None,
        })
    }

    /// What a client should do, for a layer's answer that came without text.
    fn default_detail(self) -> &'static str {
        match self {
            Self::NotFound => "no such endpoint: see /openapi.json for the routes",
            Self::MethodNotAllowed => "this route does not take that method",
            Self::RequestTimeout => "the request took longer than the server's timeout",
            Self::PayloadTooLarge => "the request body exceeds the server's limit",
            Self::UnsupportedMediaType => "send the body as Content-Type: application/json",
            _ => "the request failed",
        }
    }
}

/// An RFC 9457 problem details response.
#[derive(Debug, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    kind: String,
    title: &'static str,
    status: u16,
    detail: String,
    /// Extension members (`rule`, `position`, ...).
    #[serde(flatten)]
    extensions: BTreeMap<&'static str, Value>,
    #[serde(skip)]
    retry_after: Option<u64>,
}

impl Problem {
    /// A problem of a known kind, with a detail for people.
    pub fn of(kind: ProblemType, detail: impl Into<String>) -> Self {
        Self::new(kind.status(), kind.slug(), kind.title(), detail)
    }

    /// A problem with a status, a type slug, a title and a detail for
    /// people. Prefer [`Problem::of`], which keeps the three consistent.
    pub fn new(
        status: StatusCode,
        slug: &str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind: format!("{PROBLEM_BASE}{slug}"),
            title,
            status: status.as_u16(),
            detail: detail.into(),
            extensions: BTreeMap::new(),
            retry_after: None,
        }
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::of(ProblemType::NotFound, detail)
    }

    /// 400.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::of(ProblemType::BadRequest, detail)
    }

    /// 500: a failure that is neither the client's nor known to be
    /// transient. Logs the cause and answers without it.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "HTTP request failed");
        Self::of(
            ProblemType::Internal,
            "the server failed to handle the request; the cause is in its log",
        )
    }

    /// 503 with `Retry-After`: NATS or the read store is unreachable or
    /// overloaded. Logs the cause and answers without it.
    pub fn unavailable(e: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %e, "HTTP request failed on an unavailable dependency");
        Self::of(
            ProblemType::Unavailable,
            "the read store or the event log is unavailable; try again shortly",
        )
        .with_retry_after(1)
    }

    /// Adds a `Retry-After` header (seconds).
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// Adds an extension member, e.g. `rule` or `position`.
    pub fn with(mut self, name: &'static str, value: impl Into<Value>) -> Self {
        self.extensions.insert(name, value.into());
        self
    }

    /// The status it answers with.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry = self.retry_after;
        let mut resp = (status, Json(&self)).into_response();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = retry {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl Problem {
    /// The answer for an event store error (the same as `From`), for
    /// `map_err` at call sites that name it.
    pub fn from_events(e: sluice_events::Error) -> Self {
        Self::from(e)
    }
}

impl From<sluice_events::Error> for Problem {
    /// By kind: the caller's input 400, a conflict 409, a stored event that
    /// cannot be read 409 with its position (the remedy: void it), trouble reaching NATS 503.
    fn from(e: sluice_events::Error) -> Self {
        use sluice_events::Error as E;
        match e {
            e if e.stored_event_position().is_some() => {
                let position = e.stored_event_position().unwrap_or_default();
                Self::of(
                    ProblemType::InvalidStoredEvent,
                    format!(
                        "{e}: an operator can void it with POST /v1/events/{position}/void (or `sluice event void {position} --reason ...`)"
                    ),
                )
                .with("position", position)
            }
            E::Conflict { .. } => Self::of(ProblemType::Conflict, e.to_string()),
            // Any domain's keyed commands (`sluice_events::execute_keyed`).
            E::IdempotencyKeyReused { .. } => {
                Self::of(ProblemType::IdempotencyKeyReused, e.to_string())
            }
            E::IdempotencyInProgress(_) => Self::new(
                StatusCode::CONFLICT,
                "idempotency-key-in-progress",
                "Request in progress",
                e.to_string(),
            )
            .with_retry_after(1),
            e if e.is_invalid_input() => Self::bad_request(e.to_string()),
            e if e.is_transient() => Self::unavailable(e),
            e => Self::internal(e),
        }
    }
}

impl From<sqlx::Error> for Problem {
    fn from(e: sqlx::Error) -> Self {
        if sluice_projections::is_transient(&e) {
            Self::unavailable(e)
        } else {
            Self::internal(e)
        }
    }
}

impl From<sluice_projections::Error> for Problem {
    fn from(e: sluice_projections::Error) -> Self {
        match e {
            sluice_projections::Error::Events(e) => e.into(),
            sluice_projections::Error::Database(e) => e.into(),
            e => Self::internal(e),
        }
    }
}

/// The problem for a `Json` extractor's rejection: a body that is not JSON
/// or not of the expected shape (`shape` says which) is 400, a body without
/// `Content-Type: application/json` 415, one over the limit 413.
pub fn json_rejection(e: &JsonRejection, shape: &str) -> Problem {
    match e.status() {
        StatusCode::UNSUPPORTED_MEDIA_TYPE => Problem::of(
            ProblemType::UnsupportedMediaType,
            format!("send the body as Content-Type: application/json: {shape}"),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => Problem::of(
            ProblemType::PayloadTooLarge,
            "the request body exceeds the server's limit",
        ),
        _ => Problem::bad_request(format!("the body must be {shape}: {}", e.body_text())),
    }
}

/// Rewrites every error answer that is not already a problem (axum's
/// rejections and 404/405, tower-http's 408/413/415: plain text or empty)
/// into `application/problem+json`, keeping its status and headers such as
/// `Allow` and `Retry-After`. Answers with their own JSON (`/readyz`'s 503)
/// are left alone.
pub async fn problem_responses(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let plain = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.starts_with("text/plain"));
    if !plain {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let kind = ProblemType::for_status(status);
    let mut detail = if text.is_empty() {
        kind.map_or("the request failed", ProblemType::default_detail)
            .to_owned()
    } else {
        text
    };
    if status == StatusCode::METHOD_NOT_ALLOWED
        && let Some(allow) = parts
            .headers
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
    {
        detail = format!("{detail}; allowed: {allow}");
    }
    let problem = match kind {
        Some(kind) => Problem::of(kind, detail),
        None => Problem::new(
            status,
            "http-error",
            status.canonical_reason().unwrap_or("Error"),
            detail,
        ),
    };
    let Ok(body) = serde_json::to_vec(&problem) else {
        return Response::from_parts(parts, Body::empty());
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    Response::from_parts(parts, Body::from(body))
}

/// Refuses a JSON request body that is not an object with 400, before any
/// handler sees it: every body this API takes is an object, and serde's
/// derived structs would otherwise accept an array of the fields in order
/// (`[5]` as `{"amount": 5}`). Bodies are already size-limited outside.
pub async fn json_objects_only(req: Request, next: Next) -> Response {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().ends_with("json"))
        });
    if !is_json {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return Problem::of(
            ProblemType::PayloadTooLarge,
            "the request body exceeds the server's limit",
        )
        .into_response();
    };
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if let Some(&first) = first
        && first != b'{'
    {
        return Problem::bad_request(
            "the body must be a JSON object ({...}); arrays and bare values are refused",
        )
        .into_response();
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}
