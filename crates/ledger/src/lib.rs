//! The reference domain: accounts (open, deposit, withdraw, close) and their
//! read models, built only on the other Sluice crates.
//!
//! Read models (see `docs/projections.md`):
//! - `account_balances`: one row per account (id, owner, currency, balance
//!   in minor units, version, status, updated_at), folded set-based per batch;
//! - `account_activity`: one row per account event (account, position, type,
//!   amount, time).
//!
//! Both run on the projection runtime of `sluice-projections`, so each event
//! takes effect exactly once; events that make no sense (deposit to an
//! unknown account, non-positive or non-integer amounts, unknown types,
//! malformed data) are dead-lettered with the reason and park their account.
#![warn(clippy::unwrap_used)]

mod account;
mod events;
mod fold;
mod idempotent;
mod module;
mod read_models;
mod routes;
mod service;
mod transfer_saga;
mod transfers_read_model;

pub use account::{Account, AccountCommand, AccountRejection};
pub use events::{ACCOUNT_CATEGORY, AccountEvent, CLOSED, DEPOSITED, OPENED, WITHDRAWN, catalog};
pub use fold::{AccountRow, FoldInput, FoldOutput, STATUS_CLOSED, STATUS_OPEN, fold_balances};
pub use idempotent::{CommandOutcome, account_state, execute_account_command};
// The idempotency records are the platform's; named here too for the
// ledger's callers (HTTP, CLI, tests).
pub use module::{Ledger, module};
pub use read_models::{
    ACCOUNT_ACTIVITY, ACCOUNT_BALANCES, AccountActivity, AccountBalances, WriteMode,
};
pub use routes::routes;
pub use service::{
    DATABASE_URL_ENV, DEFAULT_HTTP_ADDR, HTTP_ADDR_ENV, Projector, ReadSide, default_database_url,
    migrate, run_read_side, serve_read_side,
};
pub use sluice_events::{
    DEFAULT_IDEMPOTENCY_RETENTION, IDEMPOTENCY_BUCKET, Idempotency, IdempotencyConfig,
    validate_idempotency_key,
};
pub use transfer_saga::{
    ACCOUNT_COMMANDS, CMD_DEPOSIT, CMD_WITHDRAW, DEFAULT_TRANSFER_DEADLINE, StartedTransfer,
    TRANSFER_ORCHESTRATOR, TRANSFER_SAGA, Transfer, TransferRejection, TransferRoleConfig,
    TransferState, TransferView, account_command_of, account_reply, check_transfer,
    describe_transfer_status, list_transfers, operate_transfer, retry_transfer,
    run_account_commands, run_transfer_orchestrator, run_transfer_role, start_transfer,
    transfer_definition, transfer_definition_with, transfer_history, transfer_state,
    transfer_status, transfer_view,
};
pub use transfers_read_model::{
    TRANSFER_STATES, TRANSFERS, Transfers, transfer_counts, transfer_transition,
};

/// The one error type of the ledger crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The projection runtime or its database failed.
    #[error(transparent)]
    Projections(#[from] sluice_projections::Error),
    /// The event store failed.
    #[error(transparent)]
    Events(#[from] sluice_events::Error),
    /// The account refused the command.
    #[error("command refused: {0}")]
    Rejected(crate::account::AccountRejection),
}
