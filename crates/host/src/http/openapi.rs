//! The OpenAPI 3.1 document: the platform's paths, each module's, and the
//! answers the layers give on every operation.

use super::*;

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
///
/// ```
/// use serde_json::json;
/// use sluice_host::http::openapi::{add_paths, err, ok, secured};
///
/// let mut doc = json!({"paths": {}});
/// add_paths(&mut doc, json!({
///     "/v1/orders": {"post": {"security": secured(), "responses": {
///         "202": ok("placed"), "422": err("refused by a rule")}}}
/// }));
/// assert!(doc["paths"]["/v1/orders"]["post"]["responses"]["422"].is_object());
/// ```
pub fn add_paths(doc: &mut Value, paths: Value) {
    if let (Some(all), Value::Object(new)) = (doc["paths"].as_object_mut(), paths) {
        all.extend(new);
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
            "/v1/projections/{name}/rows": {"get": {"summary": "Rows, cursor-paginated (limit, after, min_position)",
                "parameters": [query("limit", json!({"type": "integer", "minimum": 1, "maximum": 1000}), "rows per page (default 100)"),
                               query("after", json!({"type": "string"}), "the cursor: the previous page's next"),
                               query("min_position", json!({"type": "integer", "minimum": 0}), "wait until the projection has applied this position (read-your-writes)"),
                               header("Sluice-Min-Position", "as min_position")],
                "responses": {"200": with_etag(ok("{rows, next, checkpoint}")), "404": err("unknown projection"), "503": err("min_position not reached in time")}}},
            "/v1/projections/{name}/rows/{key}": {"get": {"summary": "One row (ETag = checkpoint; min_position waits for read-your-writes)",
                "parameters": [query("min_position", json!({"type": "integer", "minimum": 0}), "wait until the projection has applied this position (read-your-writes)"),
                               header("Sluice-Min-Position", "as min_position"),
                               header("If-None-Match", "an ETag this client has: 304 while the checkpoint did not move")],
                "responses": {"200": with_etag(ok("row")), "304": {"description": "not modified since the ETag given"}, "404": err("no such row"), "503": err("min_position not reached in time")}}},
            "/v1/streams/{category}/{id}": {
                "get": {"summary": "An aggregate's events",
                        "parameters": [query("from", json!({"type": "integer", "minimum": 0}), "first position (default: the aggregate's first event)"),
                                       query("limit", json!({"type": "integer", "minimum": 1, "maximum": 10000}), "events per page (default 1000)")],
                        "responses": {"200": ok("{stream, events, next}"), "400": err("invalid id"), "404": err("no events")}},
                "post": {"summary": "Append events (atomic, optimistic concurrency)", "security": secured,
                         "requestBody": {"content": {"application/json": {"schema": {"type": "object", "required": ["events"],
                            "properties": {"expected_version": {"oneOf": [{"type": "integer"}, {"enum": ["none", "any"]}]},
                                           "events": {"type": "array", "items": {"type": "object", "required": ["type", "data"]}}}}}}},
                         "responses": {"201": ok("appended (deduplicated: true for a retry of the same events)"), "400": err("invalid input, unknown event type or schema violation (errors: [{event, pointer, message}])"), "401": err("no or wrong token"), "403": err("reserved category"), "409": err("version conflict, an event id already used by another event (id-reused), or an invalid stored event (invalid-stored-event)"), "413": err("body too large")}}
            },
            "/v1/dlq": {"get": {"summary": "Dead letters (filter consumer, category, reason)", "security": secured,
                "parameters": [query("consumer", json!({"type": "string"}), "only this consumer's"),
                               query("category", json!({"type": "string"}), "only this category's"),
                               query("reason", json!({"type": "string"}), "only reasons containing this")],
                "responses": {"200": ok("listing"), "401": err("no or wrong token")}}},
            "/v1/dlq/{id}": {"get": {"summary": "One dead letter", "security": secured, "responses": {"200": ok("dead letter"), "404": err("unknown id")}}},
            "/v1/dlq/{id}/redrive": {"post": {"summary": "Hand a dead letter back to its consumer, or apply a projection's into it from the log (idempotent)", "security": secured, "responses": {"200": ok("redrive report"), "404": err("unknown id"), "409": err("parked behind an earlier dead letter, or a projection's without a read store here")}}},
            "/v1/dlq/{id}/discard": {"post": {"summary": "Discard a dead letter (and a projection's record and parking), with a reason kept for audit", "security": secured,
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["reason"], "properties": {"reason": {"type": "string", "minLength": 1}}}}}},
                "responses": {"200": ok("discarded"), "400": err("no reason"), "404": err("unknown id"), "409": err("a projection's dead letter without a read store here")}}},
            "/v1/events/{position}/void": {"post": {"summary": "Void a bad event: every consumer skips it (idempotent; audited as an event on sluice-void)", "security": secured,
                         "requestBody": {"content": {"application/json": {"schema": {"type": "object", "required": ["reason"], "properties": {"reason": {"type": "string", "minLength": 1}}}}}},
                         "responses": {"200": ok("the void"), "400": err("no reason or bad position"), "401": err("no or wrong token"), "404": err("no event there"), "409": err("a void record cannot be voided")}}},
            "/v1/projections/{name}/rebuild": {
                "post": {"summary": "Start a blue/green rebuild of a projection in the background (follow it with GET)", "security": secured,
                         "responses": {"202": ok("{projection, state, position, target, percent, events_per_second}"), "404": err("unknown projection"), "409": err("a rebuild is running, or no read store here")}},
                "get": {"summary": "The progress of the last rebuild of a projection this process started", "security": secured,
                        "responses": {"200": ok("{projection, state: running|done|failed, position, target, percent, events_per_second, error}"), "404": err("no rebuild started here")}}},
            "/v1/consumers": {"get": {"summary": "Durable consumers with pending, ack-pending, redeliveries, lag and pause state",
                "responses": {"200": ok("{consumers: [{stream, name, pending, ack_pending, redelivered, lag, paused, pause_remaining_secs}]}")}}},
            "/v1/consumers/{name}/pause": {"post": {"summary": "Pause a consumer, or every consumer of a worker (the kill switch)", "security": secured,
                "requestBody": {"required": false, "content": {"application/json": {"schema": {"type": "object", "properties": {"for_secs": {"type": "integer", "minimum": 1, "maximum": 2592000, "description": "how long (default 3600)"}}}}}},
                "responses": {"200": ok("{paused: [consumer], for_secs}"), "404": err("no such consumer or worker")}}},
            "/v1/consumers/{name}/resume": {"post": {"summary": "Resume a consumer, or every consumer of a worker", "security": secured,
                "responses": {"200": ok("{resumed: [consumer]}"), "404": err("no such consumer or worker")}}},
            "/ui/data/overview": {"get": {"summary": "The dashboard's overview: server, stream state and durability warnings",
                "responses": {"200": ok("{version, server, stream, warnings}")}}},
            "/v1/events": {"get": {"summary": "The log in order, a page at a time (pass next as after to continue)",
                "parameters": [
                    {"name": "after", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 0}, "description": "events after this position"},
                    {"name": "category", "in": "query", "required": false, "schema": {"type": "string"}},
                    {"name": "type", "in": "query", "required": false, "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
                "responses": {"200": ok("{events: [{position, stream, id, type, source, specversion, time, data}], next, more}"), "400": err("bad parameter")}}},
            "/v1/events/live": {"get": {"summary": "The log as Server-Sent Events (id: position; resume with Last-Event-ID)",
                "parameters": [
                    {"name": "after", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 0}},
                    {"name": "category", "in": "query", "required": false, "schema": {"type": "string"}},
                    {"name": "type", "in": "query", "required": false, "schema": {"type": "string"}},
                    {"name": "Last-Event-ID", "in": "header", "required": false, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "text/event-stream of events", "content": {"text/event-stream": {"schema": {"type": "string"}}}}, "400": err("bad parameter")}}},
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
    declare_operation_ids(&mut doc);
    doc
}

/// A query parameter.
pub fn query(name: &str, schema: Value, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "schema": schema, "description": description})
}

/// An optional request header.
pub fn header(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "header", "required": false, "schema": {"type": "string"}, "description": description})
}

/// `response` with the `ETag` header (the projection's checkpoint).
fn with_etag(mut response: Value) -> Value {
    response["headers"] = json!({"ETag": {"description": "the projection's checkpoint when read", "schema": {"type": "string"}}});
    response
}

/// Every operation without one gets an `operationId` from its method and
/// path (`GET /v1/projections/{name}/rows` → `get_projections_name_rows`),
/// so every module's operations have stable, unique names in generated
/// clients.
fn declare_operation_ids(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let words: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty() && *s != "v1")
            .map(|s| {
                s.trim_matches(|c| c == '{' || c == '}')
                    .replace(['.', '-'], "_")
            })
            .collect();
        let Some(ops) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in ops.iter_mut() {
            if method == "parameters" || op.get("operationId").is_some() {
                continue;
            }
            let id = if words.is_empty() {
                method.clone()
            } else {
                format!("{method}_{}", words.join("_"))
            };
            op["operationId"] = Value::String(id);
        }
    }
}

/// The answers the layers around every route can give (so a generated
/// client knows them): 401 and 403 (a missing token, or one without the
/// route's scope) on secured operations, 431 (oversized headers) everywhere,
/// 429 (rate limited) everywhere but the probes; an operation's own
/// description wins.
pub(super) fn declare_common_responses(doc: &mut Value) {
    let problem = |d: &str| json!({"description": d, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}});
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        // Probes are never rate limited.
        let probe = matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics");
        let has_path_params = path.contains('{');
        let Some(ops) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in ops.iter_mut() {
            if method == "parameters" {
                continue;
            }
            let secured = op.get("security").is_some();
            let has_body = op.get("requestBody").is_some();
            let has_params = has_path_params || op.get("parameters").is_some();
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
            if has_params || has_body {
                add("400", "invalid path, query, header or body");
            }
            if has_body {
                add("413", "body too large");
                add("415", "the body must be Content-Type: application/json");
            }
            // Answers that say when to come back carry Retry-After.
            for code in ["429", "503"] {
                if let Some(r) = responses.get_mut(code)
                    && r.get("headers").is_none()
                {
                    r["headers"] = json!({"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}});
                }
            }
        }
    }
}

/// OpenAPI requires every `{name}` in a path template to be declared as a
/// parameter; deriving them from the templates keeps the two from drifting.
pub(super) fn declare_path_parameters(doc: &mut Value) {
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

pub(super) async fn openapi_route(State(ctx): State<Ctx>) -> Json<Value> {
    Json(openapi_document(&ctx.app))
}
