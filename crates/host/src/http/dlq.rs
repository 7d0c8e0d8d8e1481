//! Dead letters over HTTP: list, show, redrive, discard (workers' and projections').

use super::*;
use sluice_workers::dlq;

#[derive(Debug, Deserialize)]
pub(super) struct DlqQuery {
    consumer: Option<String>,
    category: Option<String>,
    reason: Option<String>,
}

pub(super) fn dlq_error(e: sluice_workers::Error) -> Response {
    match e {
        sluice_workers::Error::NotFound(id) => problem(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            format!("no dead letter {id}"),
        ),
        e @ sluice_workers::Error::NotHead { .. } => problem(
            StatusCode::CONFLICT,
            "not-head",
            "Not the head",
            e.to_string(),
        ),
        e @ sluice_workers::Error::MissingReason => bad_request(e.to_string()),
        other => Problem::internal(other).into_response(),
    }
}

pub(super) fn projection_dlq_error(e: sluice_projections::Error) -> Response {
    match e {
        sluice_projections::Error::DeadLetters(e) => dlq_error(e),
        other => Problem::internal(other).into_response(),
    }
}

/// The projection a dead letter belongs to, when it is a projection's:
/// its record and parking live in the read store, so settling it needs that.
pub(super) async fn projection_dead_letter(ctx: &Ctx, id: u64) -> Result<Option<String>, Response> {
    match dlq::show(&ctx.store, id).await {
        Ok(e) => Ok(sluice_projections::projection_of(&e.consumer).map(str::to_owned)),
        // Let the caller's own call answer (404, or "already redriven").
        Err(sluice_workers::Error::NotFound(_)) => Ok(None),
        Err(e) => Err(dlq_error(e)),
    }
}

pub(super) fn no_read_store(projection: &str) -> Response {
    problem(
        StatusCode::CONFLICT,
        "no-read-store",
        "No read store here",
        format!(
            "this dead letter is projection {projection}'s, whose records live in the read store, and this process has none: ask an API replica that has the database, or use `sluice dlq` with --database-url"
        ),
    )
}

pub(super) async fn dlq_list(State(ctx): State<Ctx>, Query(q): Query<DlqQuery>) -> Response {
    // An empty filter is no filter; a consumer or category must be a
    // subject token, else it is the request's fault (not a 500).
    let token = |what: &'static str, v: Option<String>| -> Result<Option<String>, String> {
        match v.filter(|s| !s.is_empty()) {
            Some(s) => sluice_events::validate_token(what, &s)
                .map(|()| Some(s))
                .map_err(|e| e.to_string()),
            None => Ok(None),
        }
    };
    let filter = match (token("consumer", q.consumer), token("category", q.category)) {
        (Ok(consumer), Ok(category)) => Filter {
            consumer,
            category,
            reason: q.reason.filter(|s| !s.is_empty()),
        },
        (Err(e), _) | (_, Err(e)) => return bad_request(e),
    };
    match dlq::list(&ctx.store, &filter).await {
        Ok(listing) => Json(listing).into_response(),
        Err(e) => dlq_error(e),
    }
}

pub(super) async fn dlq_show(State(ctx): State<Ctx>, UrlPath(id): UrlPath<u64>) -> Response {
    match dlq::show(&ctx.store, id).await {
        Ok(d) => Json(d).into_response(),
        Err(e) => dlq_error(e),
    }
}

/// Hands a worker's dead letter back to it; applies a projection's from the
/// log into the projection (releasing its aggregate): one model, one answer.
pub(super) async fn dlq_redrive(State(ctx): State<Ctx>, UrlPath(id): UrlPath<u64>) -> Response {
    let projection = match projection_dead_letter(&ctx, id).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    if let Some(name) = projection {
        let Some(db) = ctx.db.clone() else {
            return no_read_store(&name);
        };
        let member = match ctx.app.projection(&name) {
            Ok(m) => m.member().clone(),
            Err(e) => return Problem::internal(e).into_response(),
        };
        return match sluice_projections::redrive_dead_letter(member, db, ctx.store.clone(), id)
            .await
        {
            Ok(r) => Json(r).into_response(),
            Err(e) => projection_dlq_error(e),
        };
    }
    match dlq::redrive(&ctx.store, RedriveTarget::Id(id)).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => dlq_error(e),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct DiscardBody {
    reason: String,
}

pub(super) async fn dlq_discard(
    State(ctx): State<Ctx>,
    UrlPath(id): UrlPath<u64>,
    body: ObjectBody<DiscardBody>,
) -> Response {
    let reason = match object_body(body, r#"{"reason": "..."}"#) {
        Ok(DiscardBody { reason }) if !reason.trim().is_empty() => reason,
        Ok(_) => return bad_request("discarding needs {\"reason\": \"...\"}, kept for audit"),
        Err(resp) => return *resp,
    };
    if let Some(db) = &ctx.db {
        // Settles a projection's records too (and a worker's as usual).
        return match sluice_projections::discard(db, &ctx.store, id, &reason).await {
            Ok(d) => Json(d).into_response(),
            Err(e) => projection_dlq_error(e),
        };
    }
    match projection_dead_letter(&ctx, id).await {
        Ok(Some(name)) => return no_read_store(&name),
        Ok(None) => {}
        Err(r) => return r,
    }
    match dlq::discard(&ctx.store, id, &reason).await {
        Ok(d) => Json(d).into_response(),
        Err(e) => dlq_error(e),
    }
}
