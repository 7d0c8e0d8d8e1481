//! The transfer saga: debit the source, credit the target; if the target
//! refuses (closed, unknown, other currency) or does not answer in time,
//! refund the source.
//!
//! The debit is a `withdrawn` on the source (so the money is out of reach
//! while in flight: no overdraft is possible, reservations included), the
//! credit a `deposited` on the target, the refund a `deposited` on the
//! source. These are the events the read models already fold; which transfer
//! moved the money is in each event's envelope (`ce-correlationid` =
//! transfer id, `ce-causationid` = `<transfer-id>/<step>[/undo]`).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sluice_events::{EventStore, validate_token};
use sluice_sagas::{
    Command, Definition, OperatorAction, OrchestratorConfig, Outcome, SagaError, SagaLog, Status,
    run_command_handler, run_orchestrator,
};
use sluice_workers::WorkerConfig;
use tokio_util::sync::CancellationToken;

use crate::account::{Account, AccountCommand};
use crate::events::ACCOUNT_CATEGORY;

/// The saga's name: instances live on `events.saga-transfer.<transfer-id>`.
pub const TRANSFER_SAGA: &str = "transfer";
/// Durable worker of the transfer orchestrator (never rename).
pub const TRANSFER_ORCHESTRATOR: &str = "ledger-transfer-saga";
/// Durable worker of the account command handler (never rename).
pub const ACCOUNT_COMMANDS: &str = "ledger-account-commands";
/// Saga command: withdraw `amount` from `target` (the debit).
pub const CMD_WITHDRAW: &str = "ledger.account.withdraw";
/// Saga command: deposit `amount` in `currency` to `target`.
pub const CMD_DEPOSIT: &str = "ledger.account.deposit";

/// A transfer's data, as the saga carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// Source account.
    pub from: String,
    /// Target account.
    pub to: String,
    /// Minor units, > 0.
    pub amount: i64,
    /// The source's currency, learnt from the debit's reply; the credit
    /// must be in it.
    #[serde(default)]
    pub currency: Option<String>,
}

fn target(id: &str) -> Value {
    json!({ "category": ACCOUNT_CATEGORY, "id": id })
}

/// Default overall deadline of a transfer: two 30 s steps and a refund fit
/// many times over, and a stuck transfer asks for help within minutes.
pub const DEFAULT_TRANSFER_DEADLINE: Duration = Duration::from_secs(5 * 60);

/// The transfer saga with a deadline of `deadline` per step and the default
/// overall deadline.
pub fn transfer_definition(deadline: Duration) -> Result<Definition<Transfer>, SagaError> {
    transfer_definition_with(deadline, DEFAULT_TRANSFER_DEADLINE)
}

/// The transfer saga with a deadline of `deadline` per step and
/// `saga_deadline` overall.
pub fn transfer_definition_with(
    deadline: Duration,
    saga_deadline: Duration,
) -> Result<Definition<Transfer>, SagaError> {
    Definition::<Transfer>::new(TRANSFER_SAGA)
        .saga_deadline(saga_deadline)
        .step("debit")
        .with_compensation(
            CMD_DEPOSIT,
            |t| json!({ "target": target(&t.from), "amount": t.amount, "currency": t.currency }),
        )
        .on_reply(|t, reply| {
            t.currency = reply["currency"].as_str().map(str::to_owned);
        })
        .deadline(deadline)
        .invoke(
            CMD_WITHDRAW,
            |t| json!({ "target": target(&t.from), "amount": t.amount }),
        )
        .step("credit")
        .deadline(deadline)
        .invoke(
            CMD_DEPOSIT,
            |t| json!({ "target": target(&t.to), "amount": t.amount, "currency": t.currency }),
        )
        .build()
}

/// Maps a saga command to an account command.
pub fn account_command_of(cmd: &Command) -> Result<AccountCommand, String> {
    let amount = cmd.payload["amount"]
        .as_i64()
        .ok_or_else(|| format!("command {} has no integer amount", cmd.id))?;
    let currency = cmd.payload["currency"].as_str().map(str::to_owned);
    match cmd.command.as_str() {
        CMD_WITHDRAW => Ok(AccountCommand::Withdraw { amount, currency }),
        CMD_DEPOSIT => Ok(AccountCommand::Deposit { amount, currency }),
        other => Err(format!("unknown account command {other:?}")),
    }
}

/// The reply an account sends: its currency and balance after the command.
pub fn account_reply(account: &Account) -> Value {
    json!({ "currency": account.currency(), "balance": account.balance() })
}

/// How the transfer role runs.
#[derive(Debug, Clone)]
pub struct TransferRoleConfig {
    /// The orchestrator (worker `ledger-transfer-saga` and its timers).
    pub orchestrator: OrchestratorConfig,
    /// The account command handler (worker `ledger-account-commands`).
    pub handler: WorkerConfig,
    /// Deadline of each step (default 30 s).
    pub deadline: Duration,
    /// Overall deadline of a transfer, from its start (and from each
    /// operator retry); default [`DEFAULT_TRANSFER_DEADLINE`].
    pub saga_deadline: Duration,
}

impl Default for TransferRoleConfig {
    fn default() -> Self {
        let mut orchestrator = OrchestratorConfig::new(TRANSFER_ORCHESTRATOR);
        // Dead-lettered account commands move their transfer to
        // `needs_attention`.
        orchestrator.command_consumers = vec![ACCOUNT_COMMANDS.to_owned()];
        Self {
            orchestrator,
            handler: WorkerConfig::new(ACCOUNT_COMMANDS),
            deadline: Duration::from_secs(30),
            saga_deadline: DEFAULT_TRANSFER_DEADLINE,
        }
    }
}

/// Runs the transfer orchestrator until `shutdown` (the `saga` role).
pub async fn run_transfer_orchestrator(
    store: &EventStore,
    config: &TransferRoleConfig,
    shutdown: CancellationToken,
) -> Result<(), SagaError> {
    let def = Arc::new(transfer_definition_with(
        config.deadline,
        config.saga_deadline,
    )?);
    run_orchestrator(store, def, config.orchestrator.clone(), shutdown).await?;
    Ok(())
}

/// Runs the account command handler until `shutdown` (part of the `saga`
/// role, or of the `worker` role when split).
pub async fn run_account_commands(
    store: &EventStore,
    config: WorkerConfig,
    shutdown: CancellationToken,
) -> Result<(), SagaError> {
    run_command_handler::<Account>(store, config, account_command_of, account_reply, shutdown)
        .await?;
    Ok(())
}

/// Runs the whole `saga` role: the transfer orchestrator and the account
/// command handler, until `shutdown`. Either failing stops both.
pub async fn run_transfer_role(
    store: &EventStore,
    mut config: TransferRoleConfig,
    shutdown: CancellationToken,
) -> Result<(), SagaError> {
    // The handler this role runs is one whose dead letters the orchestrator
    // must watch, whatever it is called.
    let handler = config.handler.name.to_owned();
    if !config.orchestrator.command_consumers.contains(&handler) {
        config.orchestrator.command_consumers.push(handler);
    }
    let stop = shutdown.child_token();
    let (a, b) = tokio::join!(
        async {
            let r = run_transfer_orchestrator(store, &config, stop.clone()).await;
            stop.cancel();
            r
        },
        async {
            let r = run_account_commands(store, config.handler.clone(), stop.clone()).await;
            stop.cancel();
            r
        }
    );
    a.and(b)
}

/// A started transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StartedTransfer {
    /// The transfer id (= saga id).
    pub id: String,
    /// Position of its `started` event (for `min_position`).
    pub position: u64,
    /// False when a transfer with this id already existed.
    pub created: bool,
}

/// Why a transfer request is refused before it starts.
fn invalid(msg: String) -> SagaError {
    SagaError::Invalid(msg)
}

/// A rule a transfer request breaks, decided before anything is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferRejection {
    /// Zero or negative amount.
    #[error("amount must be a positive integer of minor units, got {0}")]
    InvalidAmount(i64),
    /// Source and target are one account.
    #[error("from and to are the same account")]
    SameAccount,
}

impl TransferRejection {
    /// A stable name of the rule (the HTTP problem's `rule`).
    pub fn rule(&self) -> &'static str {
        match self {
            Self::InvalidAmount(_) => "amount-must-be-positive",
            Self::SameAccount => "accounts-must-differ",
        }
    }
}

/// The transfer's own rules over its request (pure; [`start_transfer`]
/// applies them, callers may ask first to answer with the typed rule).
pub fn check_transfer(from: &str, to: &str, amount: i64) -> Result<(), TransferRejection> {
    if amount <= 0 {
        return Err(TransferRejection::InvalidAmount(amount));
    }
    if from == to {
        return Err(TransferRejection::SameAccount);
    }
    Ok(())
}

/// Starts `transfer(from, to, amount)` with id `id` (a fresh UUIDv7 when
/// `None`). Starting the same id again starts nothing and returns the
/// first start. The saga role does the rest.
pub async fn start_transfer(
    store: &EventStore,
    id: Option<&str>,
    from: &str,
    to: &str,
    amount: i64,
) -> Result<StartedTransfer, SagaError> {
    validate_token("account id", from).map_err(SagaError::from)?;
    validate_token("account id", to).map_err(SagaError::from)?;
    check_transfer(from, to, amount).map_err(|r| invalid(r.to_string()))?;
    let id = match id {
        Some(id) => {
            validate_token("transfer id", id).map_err(SagaError::from)?;
            id.to_owned()
        }
        None => sluice_events::EventId::new().as_str().to_owned(),
    };
    // The definition only names the saga here; deadlines are the role's.
    let def = transfer_definition(Duration::from_secs(30))?;
    let data = Transfer {
        from: from.to_owned(),
        to: to.to_owned(),
        amount,
        currency: None,
    };
    let started = sluice_sagas::start(store, &def, &id, &data).await?;
    Ok(StartedTransfer {
        id,
        position: started.position,
        created: started.created,
    })
}

/// Applies an operator's `action` to transfer `id` (every action needs the
/// transfer in `needs_attention`; see `docs/sagas.md`) and returns the
/// transfer as it stands right after the transition:
/// - retry: the command it is stuck on goes out again as the next attempt
///   (the debit, the credit or the refund); money moves at most once per
///   step whatever earlier attempts did (effect keys);
/// - resolve: the operator states that the money is where `outcome` says
///   (completed: debited and credited; compensated: back on the source);
///   nothing moves;
/// - abandon: stop without acting (the operator fixed the money by hand);
///   nothing moves.
///
/// Unknown id: [`SagaError::UnknownInstance`]; any other state:
/// [`SagaError::WrongState`].
pub async fn operate_transfer(
    store: &EventStore,
    id: &str,
    action: OperatorAction,
    note: &str,
) -> Result<TransferView, SagaError> {
    validate_token("transfer id", id).map_err(SagaError::from)?;
    let def = transfer_definition(Duration::from_secs(30))?;
    sluice_sagas::operate(store, &def, id, action, note).await?;
    transfer_status(store, id)
        .await?
        .ok_or_else(|| SagaError::UnknownInstance {
            saga: TRANSFER_SAGA,
            id: id.to_owned(),
        })
}

/// [`operate_transfer`] with [`OperatorAction::Retry`].
pub async fn retry_transfer(
    store: &EventStore,
    id: &str,
    note: &str,
) -> Result<TransferView, SagaError> {
    operate_transfer(store, id, OperatorAction::Retry, note).await
}

/// Where a transfer stands, as `sluice saga list --state` and
/// `GET /v1/transfers?state=` filter on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferState {
    /// Running or compensating.
    Pending,
    /// Debited and credited (also: resolved as completed by an operator).
    Completed,
    /// Nothing in effect (also: resolved as compensated by an operator).
    Compensated,
    /// Stuck: an operator must retry, resolve or abandon it.
    NeedsAttention,
    /// Stopped by an operator without acting.
    Abandoned,
}

impl TransferState {
    /// Every state, in the order metrics list them.
    pub const ALL: [TransferState; 5] = [
        TransferState::Pending,
        TransferState::Completed,
        TransferState::Compensated,
        TransferState::NeedsAttention,
        TransferState::Abandoned,
    ];

    /// The wire name (`pending`, `needs_attention`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            TransferState::Pending => "pending",
            TransferState::Completed => "completed",
            TransferState::Compensated => "compensated",
            TransferState::NeedsAttention => "needs_attention",
            TransferState::Abandoned => "abandoned",
        }
    }
}

impl std::str::FromStr for TransferState {
    type Err = SagaError;

    fn from_str(s: &str) -> Result<Self, SagaError> {
        TransferState::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                SagaError::Invalid(format!(
                    "unknown transfer state {:?}: use one of {}",
                    s.chars().take(64).collect::<String>(),
                    crate::transfers_read_model::TRANSFER_STATES.join(", ")
                ))
            })
    }
}

/// Every transfer, optionally only those in `state`, folded from their saga
/// logs (for `sluice saga list [--state needs_attention]`; reads one log per
/// transfer, so prefer the `transfers` read model for large ledgers).
pub async fn list_transfers(
    store: &EventStore,
    state: Option<TransferState>,
) -> Result<Vec<TransferView>, SagaError> {
    let mut out = Vec::new();
    for id in sluice_sagas::list_instances(store, TRANSFER_SAGA).await? {
        let log = sluice_sagas::read_log(store, TRANSFER_SAGA, &id).await?;
        let view = transfer_view(&log)?;
        if state.is_none_or(|s| s.as_str() == view.state) {
            out.push(view);
        }
    }
    Ok(out)
}

/// A transfer as operators and the HTTP API see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransferView {
    /// Transfer id.
    pub id: String,
    /// Source account.
    pub from: String,
    /// Target account.
    pub to: String,
    /// Minor units.
    pub amount: i64,
    /// `pending`, `completed`, `compensated`, `needs_attention` or
    /// `abandoned` ([`TransferState`]).
    pub state: &'static str,
    /// Why it compensated or needs attention.
    pub reason: Option<String>,
    /// When it started (RFC 3339).
    pub started_at: Option<String>,
    /// When it last changed (RFC 3339).
    pub updated_at: Option<String>,
    /// Position of its last transition.
    pub version: u64,
}

/// The [`TransferState`] name of a saga status, and the reason.
pub fn transfer_state(status: &Status) -> (&'static str, Option<String>) {
    match status {
        Status::New | Status::Running { .. } => ("pending", None),
        Status::Compensating { reason, .. } => ("pending", Some(reason.clone())),
        Status::Completed => ("completed", None),
        Status::Compensated { reason } => ("compensated", Some(reason.clone())),
        Status::NeedsAttention { reason, .. } => ("needs_attention", Some(reason.clone())),
        Status::Resolved { outcome, note } => {
            (outcome.as_str(), Some(resolved_reason(*outcome, note)))
        }
        Status::Abandoned { note, reason } => ("abandoned", Some(abandoned_reason(note, reason))),
    }
}

/// The reason a resolved transfer shows.
pub(crate) fn resolved_reason(outcome: Outcome, note: &str) -> String {
    format!("resolved by an operator as {}: {note}", outcome.as_str())
}

/// The reason an abandoned transfer shows.
pub(crate) fn abandoned_reason(note: &str, reason: &str) -> String {
    if reason.is_empty() {
        format!("abandoned by an operator: {note}")
    } else {
        format!("abandoned by an operator: {note} (it needed attention: {reason})")
    }
}

/// Folds a transfer's saga log into its view.
pub fn transfer_view(log: &SagaLog) -> Result<TransferView, SagaError> {
    let def = transfer_definition(Duration::from_secs(30))?;
    let (state, _) = log.fold(&def)?;
    let (name, reason) = transfer_state(&state.status);
    Ok(TransferView {
        id: log.id.clone(),
        from: state.data.from,
        to: state.data.to,
        amount: state.data.amount,
        state: name,
        reason,
        started_at: log.records.first().and_then(|r| r.time.clone()),
        updated_at: log.records.last().and_then(|r| r.time.clone()),
        version: log.version,
    })
}

/// Reads transfer `id` from its saga log (`None` if unknown). Strongly
/// consistent: it reads the log, not a read model.
pub async fn transfer_status(
    store: &EventStore,
    id: &str,
) -> Result<Option<TransferView>, SagaError> {
    let log = sluice_sagas::read_log(store, TRANSFER_SAGA, id).await?;
    if log.version == 0 {
        return Ok(None);
    }
    Ok(Some(transfer_view(&log)?))
}

/// Transfer `id` and every transition of its saga (time, cause, status,
/// commands sent), for `sluice saga show`; `None` if unknown.
pub async fn transfer_history(
    store: &EventStore,
    id: &str,
) -> Result<Option<(TransferView, Vec<sluice_sagas::Transition>)>, SagaError> {
    let log = sluice_sagas::read_log(store, TRANSFER_SAGA, id).await?;
    if log.version == 0 {
        return Ok(None);
    }
    let def = transfer_definition(Duration::from_secs(30))?;
    Ok(Some((
        transfer_view(&log)?,
        sluice_sagas::history(&def, &log)?,
    )))
}

/// A transfer saga's status in words (`running credit`, ...).
pub fn describe_transfer_status(status: &Status) -> String {
    match transfer_definition(Duration::from_secs(30)) {
        Ok(def) => sluice_sagas::describe_status(&def, status),
        Err(_) => format!("{status:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sagas::{CommandKind, SagaEvent, SagaState, react};

    fn run(events: &[SagaEvent]) -> (SagaState<Transfer>, Vec<Command>) {
        let def = transfer_definition(Duration::from_secs(5)).unwrap();
        let mut state = SagaState::new(
            "t-1",
            Transfer {
                from: "a".into(),
                to: "b".into(),
                amount: 10,
                currency: None,
            },
        );
        let mut all = vec![];
        for e in events {
            let (s, c) = react(&def, &state, e);
            state = s;
            all.extend(c);
        }
        (state, all)
    }

    fn ok(step: usize, reply: Value) -> SagaEvent {
        SagaEvent::StepSucceeded {
            step,
            attempt: 1,
            reply,
        }
    }

    #[test]
    fn debit_then_credit_in_the_source_currency() {
        let (state, cmds) = run(&[
            SagaEvent::Started,
            ok(0, json!({"currency": "EUR", "balance": 0})),
            ok(1, json!({})),
        ]);
        assert_eq!(state.status, Status::Completed);
        assert_eq!(cmds.len(), 2);
        assert_eq!(
            account_command_of(&cmds[0]),
            Ok(AccountCommand::Withdraw {
                amount: 10,
                currency: None
            })
        );
        assert_eq!(cmds[1].payload["target"]["id"], "b");
        assert_eq!(
            account_command_of(&cmds[1]),
            Ok(AccountCommand::Deposit {
                amount: 10,
                currency: Some("EUR".into())
            })
        );
    }

    #[test]
    fn a_refused_credit_refunds_the_source() {
        let (state, cmds) = run(&[
            SagaEvent::Started,
            ok(0, json!({"currency": "EUR"})),
            SagaEvent::StepFailed {
                step: 1,
                attempt: 1,
                reason: "account is closed".into(),
            },
        ]);
        let refund = cmds.last().unwrap();
        assert_eq!(refund.kind, CommandKind::Compensation);
        assert_eq!(refund.payload["target"]["id"], "a");
        assert_eq!(refund.effect_key("t-1"), "t-1/debit/undo");
        assert!(matches!(state.status, Status::Compensating { step: 0, .. }));
        assert_eq!(transfer_state(&state.status).0, "pending");
    }

    #[test]
    fn names_are_pinned() {
        assert_eq!(TRANSFER_SAGA, "transfer");
        assert_eq!(TRANSFER_ORCHESTRATOR, "ledger-transfer-saga");
        assert_eq!(ACCOUNT_COMMANDS, "ledger-account-commands");
        assert_eq!(CMD_WITHDRAW, "ledger.account.withdraw");
        assert_eq!(CMD_DEPOSIT, "ledger.account.deposit");
    }
}
