//! A saga instance's history for operators: every stored transition with
//! its time, what caused it (a start request, a handler's claim or reply, a
//! fired deadline, an operator's retry), the status it led to and the
//! commands it sent. Derived from the log and the definition alone, so it
//! shows exactly what the orchestrator acted on.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::log::SagaLog;
use crate::model::{CommandKind, Definition, SagaError, SagaEvent, SagaState, Status, react};

/// One transition of a saga instance, as `sluice saga show` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transition {
    /// Position of the transition in `EVENTS`.
    pub position: u64,
    /// When it was appended (RFC 3339).
    pub time: Option<String>,
    /// Event type (`sluice.saga.step_succeeded.v1`, ...).
    #[serde(rename = "type")]
    pub event_type: &'static str,
    /// The stored transition.
    pub event: SagaEvent,
    /// The command it answers, claims or times out (`None` for a start or a
    /// retry).
    pub command_id: Option<String>,
    /// What caused it, in words.
    pub cause: String,
    /// The status right after it.
    pub status: Status,
    /// The commands it sent (after it was stored).
    pub commands: Vec<IssuedCommand>,
}

/// A command a transition sent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IssuedCommand {
    /// Deterministic id (`<saga-id>/<step>/<attempt>[/undo]`).
    pub id: String,
    /// Action or compensation.
    pub kind: CommandKind,
    /// Command name, e.g. `ledger.account.deposit`.
    pub command: String,
    /// Target aggregate (`<category>.<id>`), when the payload names one.
    pub target: Option<String>,
    /// When the reply is due (actions), in milliseconds after the transition.
    pub deadline_ms: Option<u64>,
}

/// Every transition of `log` with its cause, resulting status and the
/// commands it sent.
pub fn history<D: DeserializeOwned + Clone>(
    def: &Definition<D>,
    log: &SagaLog,
) -> Result<Vec<Transition>, SagaError> {
    let data: D = serde_json::from_value(log.data.clone()).map_err(|e| SagaError::Decode {
        what: "saga data",
        reason: e.to_string(),
    })?;
    let names = def.step_names();
    let mut state = SagaState::new(log.id.clone(), data);
    let mut out = Vec::with_capacity(log.records.len());
    for record in &log.records {
        let (next, commands) = react(def, &state, &record.event);
        let (command_id, cause) = cause(&log.id, &names, &record.event);
        out.push(Transition {
            position: record.position,
            time: record.time.clone(),
            event_type: crate::log::event_type(&record.event),
            event: record.event.clone(),
            command_id,
            cause,
            status: next.status.clone(),
            commands: commands
                .into_iter()
                .map(|c| IssuedCommand {
                    target: crate::log::command_target(&c)
                        .ok()
                        .map(|t| format!("{}.{}", t.category(), t.id())),
                    deadline_ms: c.deadline.map(|d| d.as_millis() as u64),
                    id: c.id,
                    kind: c.kind,
                    command: c.command,
                })
                .collect(),
        });
        state = next;
    }
    Ok(out)
}

/// The command a transition refers to and its cause in words.
fn cause(saga_id: &str, names: &[&str], event: &SagaEvent) -> (Option<String>, String) {
    let name = |step: usize| names.get(step).copied().unwrap_or("?");
    let action = |step: usize, attempt: u32| format!("{saga_id}/{}/{attempt}", name(step));
    let undo = |step: usize, attempt: u32| format!("{saga_id}/{}/{attempt}/undo", name(step));
    match event {
        SagaEvent::Started => (None, "start request".to_owned()),
        SagaEvent::StepClaimed { step, attempt } => {
            let id = action(*step, *attempt);
            let cause = format!("handler took command {id} (its deadline no longer applies)");
            (Some(id), cause)
        }
        SagaEvent::StepSucceeded {
            step,
            attempt,
            reply,
        } => {
            let id = action(*step, *attempt);
            let cause = format!("reply to {id}: succeeded {}", compact(reply));
            (Some(id), cause)
        }
        SagaEvent::StepFailed {
            step,
            attempt,
            reason,
        } => {
            let id = action(*step, *attempt);
            let cause = format!("reply to {id}: refused: {reason}");
            (Some(id), cause)
        }
        SagaEvent::StepTimedOut { step, attempt } => {
            let id = action(*step, *attempt);
            let cause = format!("deadline of {id} fired before any handler took it");
            (Some(id), cause)
        }
        SagaEvent::CompensationSucceeded { step, attempt } => {
            let id = undo(*step, *attempt);
            let cause = format!("reply to {id}: succeeded");
            (Some(id), cause)
        }
        SagaEvent::CompensationFailed {
            step,
            attempt,
            reason,
            permanent,
        } => {
            let id = undo(*step, *attempt);
            let how = if *permanent {
                "failed permanently"
            } else {
                "failed transiently"
            };
            let cause = format!("reply to {id}: {how}: {reason}");
            (Some(id), cause)
        }
        SagaEvent::Retried { note } => (None, format!("operator retry: {note}")),
        SagaEvent::Resolved { outcome, note } => (
            None,
            format!("operator resolved it as {}: {note}", outcome.as_str()),
        ),
        SagaEvent::Abandoned { note } => (None, format!("operator abandoned it: {note}")),
        SagaEvent::CommandDeadLettered {
            command,
            consumer,
            dead_letter,
            reason,
            ..
        } => (
            Some(command.clone()),
            format!("{consumer} dead-lettered {command} (dead letter {dead_letter}): {reason}"),
        ),
        SagaEvent::DeadlinePassed {
            kind,
            step,
            attempt,
            claimed,
            deadline_ms,
            ..
        } => {
            let id = match kind {
                CommandKind::Action => action(*step, *attempt),
                CommandKind::Compensation => undo(*step, *attempt),
            };
            let how = if *claimed {
                "claimed and unanswered"
            } else {
                "unanswered"
            };
            let cause = format!(
                "saga deadline ({:?}) passed while {id} was {how}",
                std::time::Duration::from_millis(*deadline_ms)
            );
            (Some(id), cause)
        }
    }
}

fn compact(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A status in words: `running debit`, `compensating debit: <reason>`, ...
pub fn describe_status<D>(def: &Definition<D>, status: &Status) -> String {
    let names = def.step_names();
    let name = |step: &usize| names.get(*step).copied().unwrap_or("?");
    match status {
        Status::New => "new".to_owned(),
        Status::Running { step } => format!("running {}", name(step)),
        Status::Compensating { step, reason } => {
            format!("compensating {}: {reason}", name(step))
        }
        Status::Completed => "completed".to_owned(),
        Status::Compensated { reason } => format!("compensated: {reason}"),
        Status::NeedsAttention { reason, .. } => format!("needs attention: {reason}"),
        Status::Resolved { outcome, note } => {
            format!("resolved by an operator as {}: {note}", outcome.as_str())
        }
        Status::Abandoned { note, .. } => format!("abandoned by an operator: {note}"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::log::SagaRecord;

    #[derive(Debug, Clone, Serialize, serde::Deserialize)]
    struct Move {
        amount: i64,
    }

    fn def() -> Definition<Move> {
        Definition::<Move>::new("move")
            .step("take")
            .with_compensation(
                "give",
                |m: &Move| json!({"target": {"category": "acc", "id": "a"}, "amount": m.amount}),
            )
            .deadline(Duration::from_secs(5))
            .invoke(
                "take",
                |m: &Move| json!({"target": {"category": "acc", "id": "a"}, "amount": m.amount}),
            )
            .step("put")
            .invoke(
                "put",
                |m: &Move| json!({"target": {"category": "acc", "id": "b"}, "amount": m.amount}),
            )
            .build()
            .unwrap()
    }

    fn log(events: Vec<SagaEvent>) -> SagaLog {
        SagaLog {
            name: "move".into(),
            id: "m-1".into(),
            data: json!({"amount": 5}),
            version: events.len() as u64,
            records: events
                .into_iter()
                .enumerate()
                .map(|(i, event)| SagaRecord {
                    position: i as u64 + 1,
                    id: format!("e{i}"),
                    time: Some(format!("2026-11-25T12:00:0{i}Z")),
                    after: Some(i as u64),
                    event,
                })
                .collect(),
        }
    }

    #[test]
    fn every_transition_names_its_cause_status_and_commands() {
        let h = history(
            &def(),
            &log(vec![
                SagaEvent::Started,
                SagaEvent::StepClaimed {
                    step: 0,
                    attempt: 1,
                },
                SagaEvent::StepSucceeded {
                    step: 0,
                    attempt: 1,
                    reply: json!({"ok": true}),
                },
                SagaEvent::StepTimedOut {
                    step: 1,
                    attempt: 1,
                },
                SagaEvent::CompensationSucceeded {
                    step: 0,
                    attempt: 1,
                },
            ]),
        )
        .unwrap();
        assert_eq!(h.len(), 5);
        assert_eq!(h[0].cause, "start request");
        assert_eq!(h[0].commands[0].id, "m-1/take/1");
        assert_eq!(h[0].commands[0].target.as_deref(), Some("acc.a"));
        assert_eq!(h[0].commands[0].deadline_ms, Some(5_000));
        assert_eq!(h[0].status, Status::Running { step: 0 });
        assert_eq!(h[1].command_id.as_deref(), Some("m-1/take/1"));
        assert!(h[1].commands.is_empty());
        assert!(h[2].cause.contains("succeeded"), "{}", h[2].cause);
        assert_eq!(h[2].commands[0].id, "m-1/put/1");
        assert_eq!(h[3].command_id.as_deref(), Some("m-1/put/1"));
        assert!(h[3].cause.starts_with("deadline of m-1/put/1"));
        assert_eq!(h[3].commands[0].id, "m-1/take/1/undo");
        assert_eq!(h[3].commands[0].kind, CommandKind::Compensation);
        assert_eq!(h[4].command_id.as_deref(), Some("m-1/take/1/undo"));
        assert!(matches!(h[4].status, Status::Compensated { .. }));
        assert_eq!(
            describe_status(&def(), &h[3].status),
            "compensating take: step put timed out after 30s"
        );
    }
}
