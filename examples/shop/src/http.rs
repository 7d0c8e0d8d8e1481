//! The shop's HTTP routes and their problems (RFC 9457). Every use of
//! the platform's problem type is in this file.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use sluice_events::EventStore;
use sluice_host::http::{ObjectBody, Problem, ProblemType, object_body, saga_error};
use sluice_sagas::SagaError;

use crate::Error;
use crate::order::{OrderLine, order_status, place_order};

/// `POST /v1/stock/{sku}/receipts`, `POST /v1/orders` and
/// `GET /v1/orders/{id}` over `store`.
pub fn routes(store: EventStore) -> Router {
    Router::new()
        .route("/v1/stock/{sku}/receipts", post(receive))
        .route("/v1/orders", post(place))
        .route("/v1/orders/{id}", get(show))
        .with_state(store)
}

/// The answer to a shop error: a refused rule is 422 naming it, the saga
/// runtime's and the event store's errors as the platform answers them
/// (the saga's own refusal, bad input, is 400).
fn problem(e: Error) -> Response {
    let rule = |detail: String, rule: &'static str| {
        Problem::of(ProblemType::Rejected, detail)
            .with("rule", rule)
            .into_response()
    };
    match e {
        Error::Stock(r) => rule(format!("command refused: {r}"), r.rule()),
        Error::Order(r) => rule(format!("order refused: {r}"), r.rule()),
        Error::Events(e) => Problem::from(e).into_response(),
        Error::Sagas(SagaError::Invalid(msg)) => Problem::bad_request(msg).into_response(),
        Error::Sagas(e) => saga_error(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiptBody {
    quantity: i64,
}

async fn receive(
    State(store): State<EventStore>,
    Path(sku): Path<String>,
    b: ObjectBody<ReceiptBody>,
) -> Result<Response, Response> {
    let b = object_body(b, r#"{"quantity": <units > 0>}"#).map_err(|r| *r)?;
    let position = crate::receive_stock(&store, &sku, b.quantity)
        .await
        .map_err(problem)?;
    let created = json!({"sku": sku, "position": position});
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderBody {
    /// Order id and idempotency key (default: a new UUIDv7).
    #[serde(default)]
    id: Option<String>,
    customer: String,
    lines: Vec<OrderLine>,
}

async fn place(
    State(store): State<EventStore>,
    b: ObjectBody<OrderBody>,
) -> Result<Response, Response> {
    let b =
        object_body(b, r#"{"customer", "lines": [{"sku", "quantity"}], "id"?}"#).map_err(|r| *r)?;
    let (id, started) = place_order(&store, b.id, b.customer, b.lines)
        .await
        .map_err(problem)?;
    let status = if started.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let placed = json!({"id": id, "position": started.position, "created": started.created});
    let location = [(header::LOCATION, format!("/v1/orders/{id}"))];
    Ok((status, location, Json(placed)).into_response())
}

async fn show(
    State(store): State<EventStore>,
    Path(id): Path<String>,
) -> Result<Response, Response> {
    match order_status(&store, &id).await.map_err(problem)? {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(Problem::not_found(format!("no order {id}")).into_response()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_openapi_paths_name_the_three_routes() {
        let mut doc = serde_json::json!({"openapi": "3.1.0", "paths": {}});
        sluice_host::Module::openapi(&crate::module(), &mut doc);
        let paths = doc["paths"].as_object().unwrap();
        let mut names: Vec<&str> = paths.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["/v1/orders", "/v1/orders/{id}", "/v1/stock/{sku}/receipts"]
        );
        let lines = &paths["/v1/orders"]["post"]["requestBody"]["content"]["application/json"]["schema"]
            ["properties"]["lines"];
        assert_eq!(lines["maxItems"], crate::MAX_LINES);
    }
}
