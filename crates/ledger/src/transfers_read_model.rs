//! The `transfers` read model: one row per transfer saga (id, from, to,
//! amount, state, reason, timestamps), folded from
//! `events.saga-transfer.<id>` on the projection runtime, so each saga event
//! takes effect exactly once.

use sluice_events::StreamId;
use sluice_projections::{
    Column, KeyedReadModel, KeyedTable, ProjectedEvent, Projection, Rejection, RewindSupport,
    RowChange, StateRows, Tables,
};
use sluice_sagas::{Observed, SAGA_CATEGORY_PREFIX, SagaEvent, observe};
use sqlx::{AnyConnection, Row};

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

/// Writes: one row per transfer saga, moved by [`transfer_transition`].
/// A final row stays final: `react` ignores whatever arrives after an end
/// (a late reply after an operator resolved the transfer, say), and so
/// does the row.
static WRITES: StateRows = StateRows {
    table: TRANSFERS,
    key: "id",
    data: &["from_account", "to_account", "amount"],
    created_at: "started_at",
    initial: "pending",
    finals: &["completed", "compensated", "abandoned"],
};

fn change(e: &ProjectedEvent) -> Result<RowChange, String> {
    Ok(match observe::<Transfer>(&e.envelope, "transfer")? {
        Observed::Started(t) => {
            RowChange::Insert(vec![t.from.into(), t.to.into(), t.amount.into()])
        }
        Observed::Transition(event) => {
            let (state, reason) = transfer_transition(&event);
            RowChange::Update(state, reason)
        }
    })
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
        WRITES.apply(conn, tables, events, change).await
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
        Self::ROWS.delete_aggregates(conn, tables, aggregates).await
    }
}

impl KeyedReadModel for Transfers {
    const ROWS: KeyedTable = KeyedTable {
        table: TRANSFERS,
        key: Column::text("id"),
        columns: &[
            Column::text("from_account").as_field("from"),
            Column::text("to_account").as_field("to"),
            Column::int("amount"),
            Column::text("state"),
            Column::optional_text("reason"),
            Column::text("started_at"),
            Column::text("updated_at"),
            Column::int("version"),
        ],
        category: None,
    };
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

    use serde_json::{Value, json};

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
