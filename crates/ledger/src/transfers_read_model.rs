//! The `transfers` read model: one row per transfer saga (id, from, to,
//! amount, state, reason, timestamps), folded from
//! `events.saga-transfer.<id>` on the projection runtime, so each saga event
//! takes effect exactly once.

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use sluice_events::StreamId;
use sluice_projections::{
    Page, ProjectedEvent, Projection, ReadModel, Rejection, RewindSupport, Tables,
};
use sluice_sagas::{SAGA_CATEGORY_PREFIX, STARTED, SagaEvent};
use sqlx::{AnyConnection, Row};
use time::format_description::well_known::Rfc3339;

use crate::transfer_saga::{TRANSFER_SAGA, Transfer};

/// Projection (and table) name: a constant, the checkpoint key.
pub const TRANSFERS: &str = "transfers";
/// The saga stream category it reads.
const CATEGORY: &str = "saga-transfer";

/// What one saga event does to a transfer's row: the new state (if it
/// changes) and the reason (if one is learnt). Mirrors what `react` does for
/// the two-step transfer: a failure or timeout of the debit ends it
/// compensated at once (nothing to undo), one of the credit starts the
/// refund, the refund's outcome ends it.
pub fn transfer_transition(event: &SagaEvent) -> (Option<&'static str>, Option<String>) {
    let step_name = |s: usize| if s == 0 { "debit" } else { "credit" };
    match event {
        SagaEvent::StepSucceeded { step: 1, .. } => (Some("completed"), None),
        SagaEvent::StepFailed { step, reason, .. } => (
            Some(if *step == 0 { "compensated" } else { "pending" }),
            Some(format!("step {} failed: {reason}", step_name(*step))),
        ),
        SagaEvent::StepTimedOut { step, .. } => (
            Some(if *step == 0 { "compensated" } else { "pending" }),
            Some(format!("step {} timed out", step_name(*step))),
        ),
        SagaEvent::CompensationSucceeded { .. } => (Some("compensated"), None),
        SagaEvent::Retried { .. } => (Some("pending"), None),
        SagaEvent::Resolved { outcome, note } => (
            Some(outcome.as_str()),
            Some(crate::transfer_saga::resolved_reason(*outcome, note)),
        ),
        SagaEvent::Abandoned { note } => (
            Some("abandoned"),
            Some(crate::transfer_saga::abandoned_reason(note, "")),
        ),
        SagaEvent::CommandDeadLettered {
            command,
            consumer,
            dead_letter,
            reason,
            ..
        } => (
            Some("needs_attention"),
            Some(format!(
                "command {command} was dead-lettered by {consumer} (dead letter {dead_letter}): {reason}"
            )),
        ),
        SagaEvent::DeadlinePassed {
            kind,
            step,
            claimed,
            deadline_ms,
            ..
        } => {
            let after = std::time::Duration::from_millis(*deadline_ms);
            let name = step_name(*step);
            match (kind, claimed) {
                (sluice_sagas::CommandKind::Action, false) => (
                    Some(if *step == 0 { "compensated" } else { "pending" }),
                    Some(format!(
                        "saga deadline of {after:?} passed during step {name}"
                    )),
                ),
                (sluice_sagas::CommandKind::Action, true) => (
                    Some("needs_attention"),
                    Some(format!(
                        "saga deadline of {after:?} passed while step {name} was claimed by its handler and unanswered: whether it took effect is unknown"
                    )),
                ),
                (sluice_sagas::CommandKind::Compensation, _) => (
                    Some("needs_attention"),
                    Some(format!(
                        "saga deadline of {after:?} passed while compensating step {name} (the compensation is unconfirmed)"
                    )),
                ),
            }
        }
        SagaEvent::CompensationFailed {
            step,
            reason,
            permanent: true,
            ..
        } => (
            Some("needs_attention"),
            Some(format!(
                "compensation of step {} failed permanently: {reason}",
                step_name(*step)
            )),
        ),
        _ => (None, None),
    }
}

/// The `transfers` projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Transfers;

fn time_of(e: &ProjectedEvent) -> String {
    e.envelope
        .time
        .unwrap_or(e.appended_at)
        .format(&Rfc3339)
        .unwrap_or_default()
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

enum Change {
    Start(Transfer),
    Update(Option<&'static str>, Option<String>),
}

fn decode(e: &ProjectedEvent) -> Result<Change, String> {
    if e.envelope.event_type == STARTED {
        let v: Value = serde_json::from_slice(&e.envelope.data)
            .map_err(|err| format!("malformed {STARTED} data: {err}"))?;
        let t: Transfer = serde_json::from_value(v["data"].clone())
            .map_err(|err| format!("malformed transfer data: {err}"))?;
        return Ok(Change::Start(t));
    }
    let event: SagaEvent = serde_json::from_slice(&e.envelope.data).map_err(|err| {
        format!(
            "malformed saga event {:?}: {err}",
            e.envelope.event_type.chars().take(64).collect::<String>()
        )
    })?;
    let (state, reason) = transfer_transition(&event);
    Ok(Change::Update(state, reason))
}

impl Projection for Transfers {
    fn name(&self) -> &'static str {
        TRANSFERS
    }

    fn categories(&self) -> &'static [&'static str] {
        &[CATEGORY]
    }

    fn tables(&self) -> &'static [&'static str] {
        &[TRANSFERS]
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        tables: &Tables,
        events: &[ProjectedEvent],
    ) -> Result<Vec<Rejection>, sqlx::Error> {
        let table = tables.name(TRANSFERS);
        let mut changes = Vec::with_capacity(events.len());
        let mut rejected = Vec::new();
        for e in events {
            match decode(e) {
                Ok(c) => changes.push((e, c)),
                Err(reason) => rejected.push(Rejection::new(e.position, reason)),
            }
        }
        if !rejected.is_empty() {
            return Ok(rejected);
        }
        // Row at a time: a transfer has a handful of events, and sagas are
        // far fewer than account events.
        for (e, change) in changes {
            let at = time_of(e);
            match change {
                Change::Start(t) => {
                    let sql = format!(
                        "INSERT INTO {table} (id, from_account, to_account, amount, state, reason, \
                         started_at, updated_at, version) \
                         VALUES ($1, $2, $3, $4, 'pending', NULL, $5, $5, $6) \
                         ON CONFLICT (id) DO NOTHING"
                    );
                    sqlx::query(&sql)
                        .bind(e.stream_id.id())
                        .bind(t.from.as_str())
                        .bind(t.to.as_str())
                        .bind(t.amount)
                        .bind(at.as_str())
                        .bind(to_i64(e.position))
                        .execute(&mut *conn)
                        .await?;
                }
                Change::Update(state, reason) => {
                    // A final row stays final: `react` ignores whatever
                    // arrives after an end (a late reply after an operator
                    // resolved the transfer, say), and so does the row.
                    let sql = format!(
                        "UPDATE {table} SET state = COALESCE($1, state), \
                         reason = COALESCE($2, reason), updated_at = $3, version = $4 \
                         WHERE id = $5 AND state NOT IN ('completed', 'compensated', 'abandoned')"
                    );
                    sqlx::query(&sql)
                        .bind(state)
                        .bind(reason)
                        .bind(at.as_str())
                        .bind(to_i64(e.position))
                        .bind(e.stream_id.id())
                        .execute(&mut *conn)
                        .await?;
                }
            }
        }
        Ok(Vec::new())
    }

    /// A row is the fold of its saga's events alone (an update overwrites
    /// state and reason, so it cannot be undone by position): forget the
    /// transfers touched from the replay position on; the runtime folds
    /// their earlier events again.
    fn rewind_support(&self) -> RewindSupport {
        RewindSupport::ByAggregate
    }

    async fn rewind(
        &self,
        conn: &mut AnyConnection,
        tables: &Tables,
        _from: u64,
        aggregates: &[StreamId],
    ) -> Result<(), sqlx::Error> {
        crate::read_models::delete_ids(conn, &tables.name(TRANSFERS), "id", aggregates).await
    }
}

const COLUMNS: &str =
    "id, from_account, to_account, amount, state, reason, started_at, updated_at, version";

fn row_json(r: &sqlx::any::AnyRow) -> Result<Value, sqlx::Error> {
    Ok(json!({
        "id": r.try_get::<String, _>(0)?,
        "from": r.try_get::<String, _>(1)?,
        "to": r.try_get::<String, _>(2)?,
        "amount": r.try_get::<i64, _>(3)?,
        "state": r.try_get::<String, _>(4)?,
        "reason": r.try_get::<Option<String>, _>(5)?,
        "started_at": r.try_get::<String, _>(6)?,
        "updated_at": r.try_get::<String, _>(7)?,
        "version": r.try_get::<i64, _>(8)?,
    }))
}

impl ReadModel for Transfers {
    fn name(&self) -> &'static str {
        TRANSFERS
    }

    fn get<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Value>, sqlx::Error>> {
        async move {
            let sql = format!("SELECT {COLUMNS} FROM {TRANSFERS} WHERE id = $1");
            let row = sqlx::query(&sql).bind(key).fetch_optional(conn).await?;
            row.as_ref().map(row_json).transpose()
        }
        .boxed()
    }

    fn list<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        after: Option<&'a str>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Page, sqlx::Error>> {
        async move {
            let sql =
                format!("SELECT {COLUMNS} FROM {TRANSFERS} WHERE id > $1 ORDER BY id LIMIT $2");
            let rows = sqlx::query(&sql)
                .bind(after.unwrap_or(""))
                .bind(i64::from(limit))
                .fetch_all(conn)
                .await?;
            let rows = rows.iter().map(row_json).collect::<Result<Vec<_>, _>>()?;
            let next = (rows.len() == limit as usize)
                .then(|| {
                    rows.last()
                        .and_then(|r| r["id"].as_str().map(str::to_owned))
                })
                .flatten();
            Ok(Page { rows, next })
        }
        .boxed()
    }
}

// The category is derived from the saga's name; keep them in step.
const _: () = {
    let a = CATEGORY.as_bytes();
    let p = SAGA_CATEGORY_PREFIX.as_bytes();
    let n = TRANSFER_SAGA.as_bytes();
    assert!(a.len() == p.len() + n.len());
};

/// Every state a transfer's row can be in, in the order metrics list them.
pub const TRANSFER_STATES: [&str; 5] = [
    "pending",
    "completed",
    "compensated",
    "needs_attention",
    "abandoned",
];

/// How many transfers are in each state, from the read model: every state of
/// [`TRANSFER_STATES`], with 0 for the empty ones.
///
/// The read model rather than the orchestrators' own counters: it holds one
/// row per saga instance whatever replica advanced it, survives restarts,
/// and `transfers_by_state` makes the count an index-only scan.
pub async fn transfer_counts(
    db: &sluice_projections::Database,
) -> Result<Vec<(&'static str, u64)>, sluice_projections::Error> {
    let rows = sqlx::query(&format!(
        "SELECT state, COUNT(*) FROM {} GROUP BY state",
        Tables::LIVE.name(TRANSFERS)
    ))
    .fetch_all(db.pool())
    .await?;
    let mut counts: Vec<(&'static str, u64)> = TRANSFER_STATES.iter().map(|s| (*s, 0)).collect();
    for row in rows {
        let state: String = row.try_get(0)?;
        let n: i64 = row.try_get(1)?;
        if let Some(c) = counts.iter_mut().find(|(s, _)| *s == state) {
            c.1 = u64::try_from(n).unwrap_or(0);
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use sluice_sagas::{SagaState, react};

    use crate::transfer_saga::{transfer_definition, transfer_state};

    /// The projection's transitions agree with the saga model's fold.
    #[test]
    fn transitions_agree_with_the_saga_model() {
        let ok = |step, reply: Value| SagaEvent::StepSucceeded {
            step,
            attempt: 1,
            reply,
        };
        let eur = json!({"currency": "EUR"});
        let paths: Vec<Vec<SagaEvent>> = vec![
            vec![SagaEvent::Started, ok(0, eur.clone()), ok(1, json!({}))],
            vec![
                SagaEvent::Started,
                SagaEvent::StepFailed {
                    step: 0,
                    attempt: 1,
                    reason: "insufficient funds".into(),
                },
            ],
            vec![
                SagaEvent::Started,
                SagaEvent::StepTimedOut {
                    step: 0,
                    attempt: 1,
                },
            ],
            vec![
                SagaEvent::Started,
                ok(0, eur.clone()),
                SagaEvent::StepFailed {
                    step: 1,
                    attempt: 1,
                    reason: "account is closed".into(),
                },
                SagaEvent::CompensationSucceeded {
                    step: 0,
                    attempt: 1,
                },
            ],
            vec![
                SagaEvent::Started,
                ok(0, eur),
                SagaEvent::StepTimedOut {
                    step: 1,
                    attempt: 1,
                },
                SagaEvent::CompensationFailed {
                    step: 0,
                    attempt: 1,
                    reason: "db".into(),
                    permanent: false,
                },
                SagaEvent::CompensationFailed {
                    step: 0,
                    attempt: 2,
                    reason: "account is closed".into(),
                    permanent: true,
                },
            ],
            vec![
                SagaEvent::Started,
                SagaEvent::CommandDeadLettered {
                    kind: sluice_sagas::CommandKind::Action,
                    step: 0,
                    attempt: 1,
                    command: "t/debit/1".into(),
                    consumer: "ledger-account-commands".into(),
                    dead_letter: 3,
                    reason: "parked".into(),
                },
                SagaEvent::Abandoned {
                    note: "by hand".into(),
                },
            ],
            vec![
                SagaEvent::Started,
                ok(0, json!({"currency": "EUR"})),
                SagaEvent::DeadlinePassed {
                    armed: 1,
                    kind: sluice_sagas::CommandKind::Action,
                    step: 1,
                    attempt: 1,
                    claimed: true,
                    deadline_ms: 300_000,
                },
                SagaEvent::Resolved {
                    outcome: sluice_sagas::Outcome::Compensated,
                    note: "checked".into(),
                },
            ],
            vec![
                SagaEvent::Started,
                SagaEvent::DeadlinePassed {
                    armed: 1,
                    kind: sluice_sagas::CommandKind::Action,
                    step: 0,
                    attempt: 1,
                    claimed: false,
                    deadline_ms: 300_000,
                },
            ],
        ];
        let def = transfer_definition(Duration::from_secs(30)).unwrap();
        for path in paths {
            let data = Transfer {
                from: "a".into(),
                to: "b".into(),
                amount: 1,
                currency: None,
            };
            let mut model = SagaState::new("t", data);
            let (mut state, mut reason) = ("pending", None::<String>);
            for e in &path {
                model = react(&def, &model, e).0;
                let (s, r) = transfer_transition(e);
                state = s.unwrap_or(state);
                reason = r.or(reason);
            }
            let (want_state, want_reason) = transfer_state(&model.status);
            assert_eq!(state, want_state, "{path:?}");
            if want_state != "completed" {
                let (got, want) = (reason.unwrap_or_default(), want_reason.unwrap_or_default());
                // The model's timeout reason adds the deadline.
                assert!(want.starts_with(&got), "{got:?} vs {want:?}");
            }
        }
    }
}
