//! The ledger's HTTP routes: accounts (open, deposit, withdraw, with
//! Idempotency-Key), transfers (start, show, list) and the operator's
//! actions on a transfer that needs attention. The host puts them behind
//! its authentication, rate limits and problem documents.

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use sluice_events::EventStore;
use sluice_host::http::{
    IDEMPOTENT_REPLAYED, ObjectBody, Problem, ProblemType, bad_request, idempotency_key,
    key_reused, object_body, problem, saga_error,
};

use crate::Idempotency;

/// What the ledger's handlers share.
#[derive(Debug, Clone)]
pub(crate) struct Routes {
    store: EventStore,
    idempotency: Idempotency,
}

/// The ledger's routes over `store`, keyed requests recorded in
/// `idempotency`.
pub fn routes(store: EventStore, idempotency: Idempotency) -> Router {
    Router::new()
        .route("/v1/transfers", post(start_transfer).get(list_transfers))
        .route("/v1/transfers/{id}", get(get_transfer))
        .route("/v1/accounts", post(open_account))
        .route("/v1/accounts/{id}/deposits", post(deposit))
        .route("/v1/accounts/{id}/withdrawals", post(withdraw))
        .route("/v1/sagas/{id}/retry", post(saga_retry))
        .route("/v1/sagas/{id}/resolve", post(saga_resolve))
        .route("/v1/sagas/{id}/abandon", post(saga_abandon))
        .with_state(Routes { store, idempotency })
}

/// Body of `POST /v1/transfers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferBody {
    from: String,
    to: String,
    amount: i64,
    /// Transfer id and idempotency key (default: a new UUIDv7).
    #[serde(default)]
    id: Option<String>,
}

async fn start_transfer(
    State(ctx): State<Routes>,
    headers: axum::http::HeaderMap,
    body: ObjectBody<TransferBody>,
) -> Response {
    let b = match object_body(body, r#"{"from", "to", "amount", "id"?}"#) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    if let Err(r) = crate::check_transfer(&b.from, &b.to, b.amount) {
        return Problem::of(ProblemType::Rejected, format!("transfer refused: {r}"))
            .with("rule", r.rule())
            .into_response();
    }
    // The transfer id is the idempotency key; a key given both ways must agree.
    let key = match idempotency_key(&headers) {
        Ok(k) => k,
        Err(resp) => return *resp,
    };
    let id = match (b.id.as_deref(), key.as_deref()) {
        (Some(a), Some(k)) if a != k => {
            return bad_request("the body's id and the Idempotency-Key differ");
        }
        (a, k) => a.or(k).map(str::to_owned),
    };
    match crate::start_transfer(&ctx.store, id.as_deref(), &b.from, &b.to, b.amount).await {
        Ok(t) if !t.created => match crate::transfer_status(&ctx.store, &t.id).await {
            Ok(Some(v)) if v.from == b.from && v.to == b.to && v.amount == b.amount => (
                StatusCode::OK,
                [(header::LOCATION, format!("/v1/transfers/{}", t.id))],
                Json(
                    json!({"id": t.id, "position": t.position, "created": false, "state": v.state}),
                ),
            )
                .into_response(),
            Ok(_) => key_reused(format!(
                "Idempotency-Key {:?} was already used for another transfer (other accounts or amount); use a new key for a new transfer",
                t.id
            )),
            Err(e) => saga_error(e),
        },
        Ok(t) => (
            if t.created {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            },
            [(header::LOCATION, format!("/v1/transfers/{}", t.id))],
            Json(json!({"id": t.id, "position": t.position, "created": t.created})),
        )
            .into_response(),
        Err(e) => saga_error(e),
    }
}

async fn get_transfer(State(ctx): State<Routes>, UrlPath(id): UrlPath<String>) -> Response {
    if let Err(e) = sluice_events::validate_token("transfer id", &id) {
        return bad_request(e.to_string());
    }
    match crate::transfer_status(&ctx.store, &id).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            format!("no transfer {id}"),
        ),
        Err(e) => saga_error(e),
    }
}

/// Body of `POST /v1/accounts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenBody {
    #[serde(default)]
    id: Option<String>,
    owner: String,
    currency: String,
}

/// Body of deposits and withdrawals.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AmountBody {
    amount: i64,
}

async fn account_command_response(
    ctx: &Routes,
    id: &str,
    command: crate::AccountCommand,
    key: Option<String>,
) -> Response {
    let keyed = key.as_deref().map(|k| (&ctx.idempotency, k));
    match crate::execute_account_command(&ctx.store, id, &command, keyed).await {
        Ok(o) => {
            // A repeat answers the first response (201) again, marked.
            let mut resp = (
                StatusCode::CREATED,
                Json(json!({"id": o.account, "positions": o.positions, "position": o.version, "replayed": o.replayed})),
            )
                .into_response();
            if o.replayed {
                resp.headers_mut()
                    .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
            }
            resp
        }
        Err(crate::Error::Rejected(r)) => rejected(&r),
        // A reused or busy key (422, 409), an undecodable stored event
        // (409 naming it): as for any domain.
        Err(crate::Error::Events(e)) => Problem::from(e).into_response(),
        Err(e) => Problem::internal(e).into_response(),
    }
}

/// A refused account command: 422 naming the rule, except that an account
/// that already exists is a conflict (409) and a missing one is 404.
fn rejected(r: &crate::AccountRejection) -> Response {
    let kind = match r {
        crate::AccountRejection::AlreadyOpen => ProblemType::Conflict,
        crate::AccountRejection::NotFound => ProblemType::NotFound,
        _ => ProblemType::Rejected,
    };
    Problem::of(kind, format!("command refused: {r}"))
        .with("rule", r.rule())
        .into_response()
}

async fn open_account(
    State(ctx): State<Routes>,
    headers: axum::http::HeaderMap,
    body: ObjectBody<OpenBody>,
) -> Response {
    let b = match object_body(body, r#"{"owner", "currency", "id"?}"#) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let key = match idempotency_key(&headers) {
        Ok(k) => k,
        Err(resp) => return *resp,
    };
    let id =
        b.id.or_else(|| key.clone())
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let cmd = crate::AccountCommand::Open {
        owner: b.owner,
        currency: b.currency,
    };
    account_command_response(&ctx, &id, cmd, key).await
}

/// Deposits and withdrawals: one body shape, one path through the aggregate.
async fn amount_command(
    ctx: &Routes,
    id: &str,
    headers: &axum::http::HeaderMap,
    body: ObjectBody<AmountBody>,
    command: fn(i64) -> crate::AccountCommand,
) -> Response {
    let b = match object_body(body, r#"{"amount": <minor units>}"#) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    match idempotency_key(headers) {
        Ok(key) => account_command_response(ctx, id, command(b.amount), key).await,
        Err(resp) => *resp,
    }
}

async fn deposit(
    State(ctx): State<Routes>,
    UrlPath(id): UrlPath<String>,
    headers: axum::http::HeaderMap,
    body: ObjectBody<AmountBody>,
) -> Response {
    amount_command(&ctx, &id, &headers, body, |amount| {
        crate::AccountCommand::Deposit {
            amount,
            currency: None,
        }
    })
    .await
}

async fn withdraw(
    State(ctx): State<Routes>,
    UrlPath(id): UrlPath<String>,
    headers: axum::http::HeaderMap,
    body: ObjectBody<AmountBody>,
) -> Response {
    amount_command(&ctx, &id, &headers, body, |amount| {
        crate::AccountCommand::Withdraw {
            amount,
            currency: None,
        }
    })
    .await
}

#[derive(Debug, Deserialize)]
struct TransferQuery {
    state: Option<String>,
}

async fn list_transfers(State(ctx): State<Routes>, Query(q): Query<TransferQuery>) -> Response {
    let state = match q.state.as_deref().map(str::parse).transpose() {
        Ok(s) => s,
        // An unknown filter value: the request's fault (400), not a rule.
        Err(sluice_sagas::SagaError::Invalid(msg)) => return bad_request(msg),
        Err(e) => return saga_error(e),
    };
    match crate::list_transfers(&ctx.store, state).await {
        Ok(v) => Json(json!({"transfers": v})).into_response(),
        Err(e) => saga_error(e),
    }
}

/// Body of `POST /v1/sagas/{id}/retry|resolve|abandon`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperatorBody {
    /// Who and why, kept in the saga's log.
    note: String,
    /// `completed` or `compensated` (resolve only).
    #[serde(default)]
    outcome: Option<String>,
}

/// One operator action on transfer `id`: 200 with the transfer after it,
/// 404 for an unknown id, 409 naming the state when it does not apply.
async fn operate(
    ctx: &Routes,
    id: &str,
    body: Result<Json<OperatorBody>, axum::extract::rejection::JsonRejection>,
    action: impl FnOnce(Option<&str>) -> Result<sluice_sagas::OperatorAction, String>,
) -> Response {
    let Json(b) = match body {
        Ok(b) => b,
        Err(e) => {
            return bad_request(format!(
                "the body must be {{\"note\": \"who and why\", \"outcome\"?}}: {}",
                e.body_text()
            ));
        }
    };
    let action = match action(b.outcome.as_deref()) {
        Ok(a) => a,
        Err(why) => return bad_request(why),
    };
    match crate::operate_transfer(&ctx.store, id, action, &b.note).await {
        Ok(v) => Json(v).into_response(),
        // A blank note or a bad outcome: the request's fault, not a rule.
        Err(sluice_sagas::SagaError::Invalid(msg)) => bad_request(msg),
        Err(e) => saga_error(e),
    }
}

async fn saga_retry(
    State(ctx): State<Routes>,
    UrlPath(id): UrlPath<String>,
    body: Result<Json<OperatorBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    operate(&ctx, &id, body, |outcome| match outcome {
        None => Ok(sluice_sagas::OperatorAction::Retry),
        Some(_) => Err("retry takes no outcome; use resolve".to_owned()),
    })
    .await
}

async fn saga_resolve(
    State(ctx): State<Routes>,
    UrlPath(id): UrlPath<String>,
    body: Result<Json<OperatorBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    operate(&ctx, &id, body, |outcome| {
        let Some(outcome) = outcome else {
            return Err(
                "resolve needs {\"outcome\": \"completed\" | \"compensated\", \"note\"}".to_owned(),
            );
        };
        outcome
            .parse()
            .map(sluice_sagas::OperatorAction::Resolve)
            .map_err(|e: sluice_sagas::SagaError| e.to_string())
    })
    .await
}

async fn saga_abandon(
    State(ctx): State<Routes>,
    UrlPath(id): UrlPath<String>,
    body: Result<Json<OperatorBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    operate(&ctx, &id, body, |outcome| match outcome {
        None => Ok(sluice_sagas::OperatorAction::Abandon),
        Some(_) => Err("abandon takes no outcome; use resolve".to_owned()),
    })
    .await
}
