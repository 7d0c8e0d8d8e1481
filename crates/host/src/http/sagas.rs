//! Saga errors as problem documents.

use super::*;

/// A saga call's error as a problem: 404 unknown instance, 409 wrong state,
/// 422 a rule of the saga, else the event store's or 500.
pub fn saga_error(e: sluice_sagas::SagaError) -> Response {
    match e {
        e if e.is_unknown_instance() => problem(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            e.to_string(),
        ),
        e if e.is_wrong_state() => problem(
            StatusCode::CONFLICT,
            "wrong-state",
            "Not in a state this action applies to",
            e.to_string(),
        ),
        // The transfer's own rules (a positive amount, two accounts).
        sluice_sagas::SagaError::Invalid(msg) => Problem::of(ProblemType::Rejected, msg)
            .with("rule", "transfer")
            .into_response(),
        sluice_sagas::SagaError::Events(e) => Problem::from(e).into_response(),
        other => Problem::internal(other).into_response(),
    }
}
