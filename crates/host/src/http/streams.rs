//! Appends (`POST /v1/streams/{category}/{id}`), voids, and the body and
//! idempotency helpers every write route uses.

use super::*;

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
pub(super) struct AppendBody {
    /// Expected version: a number, "none" or "any" (default).
    #[serde(default)]
    expected_version: Option<Value>,
    events: Vec<Object<AppendEvent>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AppendEvent {
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

pub(super) async fn append(
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
pub(super) struct VoidBody {
    reason: String,
}

pub(super) async fn void_event(
    State(ctx): State<Ctx>,
    UrlPath(position): UrlPath<String>,
    body: Result<Json<VoidBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Some(position) = position.parse::<u64>().ok().filter(|p| *p > 0) else {
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
