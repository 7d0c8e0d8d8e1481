//! Account commands from the outside world (HTTP, CLI) with an optional
//! idempotency key: the platform's keyed loop
//! ([`sluice_events::execute_keyed`], semantics in its module docs and
//! `docs/contract.md`, "Idempotency keys") run on the [`Account`]. What is
//! the ledger's own: what an account command binds its key to, the
//! fingerprint its keyed events carried before the records existed, and
//! its errors.

use serde::Serialize;
use serde_json::{Value, json};
use sluice_events::{EventStore, ExecuteError, Idempotency, IdempotentCommand, StreamId};

use crate::Error;
use crate::account::{Account, AccountCommand};
use crate::events::ACCOUNT_CATEGORY;

impl IdempotentCommand for AccountCommand {
    fn operation(&self) -> &'static str {
        match self {
            AccountCommand::Open { .. } => "open",
            AccountCommand::Deposit { .. } => "deposit",
            AccountCommand::Withdraw { .. } => "withdraw",
            AccountCommand::Close => "close",
        }
    }

    fn request(&self) -> Value {
        match self {
            AccountCommand::Open { owner, currency } => {
                json!({"owner": owner, "currency": currency})
            }
            AccountCommand::Deposit { amount, currency }
            | AccountCommand::Withdraw { amount, currency } => {
                json!({"amount": amount, "currency": currency})
            }
            AccountCommand::Close => json!({}),
        }
    }

    fn legacy_fingerprint(&self) -> Option<String> {
        Some(legacy_fingerprint(self))
    }
}

/// FNV-1a over the command's canonical text, as the event ids of keyed
/// commands carried before the records existed.
fn legacy_fingerprint(command: &AccountCommand) -> String {
    let text = format!("{command:?}");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Where an account command landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandOutcome {
    /// The account.
    pub account: String,
    /// Positions of the events it appended (empty for a no-op).
    pub positions: Vec<u64>,
    /// The account's version after it (pass as `min_position`).
    pub version: u64,
    /// True when an earlier request with the same key had already done it:
    /// this is the first response again.
    pub replayed: bool,
}

/// Runs `command` on account `id` (load → decide → append, reloading on a
/// conflict); with `key`, once per key.
pub async fn execute_account_command(
    store: &EventStore,
    id: &str,
    command: &AccountCommand,
    key: Option<(&Idempotency, &str)>,
) -> Result<CommandOutcome, Error> {
    match sluice_events::execute_keyed::<Account>(store, id, command, key).await {
        Ok(o) => Ok(CommandOutcome {
            account: id.to_owned(),
            positions: o.positions,
            version: o.version,
            replayed: o.replayed,
        }),
        Err(ExecuteError::Rejected(r)) => Err(Error::Rejected(r)),
        Err(ExecuteError::Store(e)) => Err(Error::Events(e)),
    }
}

/// The account's current state and version, folded from its log.
pub async fn account_state(store: &EventStore, id: &str) -> Result<(Account, u64), Error> {
    let stream = StreamId::new(ACCOUNT_CATEGORY, id)?;
    Ok(sluice_events::load::<Account>(store, &stream).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deposit(amount: i64) -> AccountCommand {
        AccountCommand::Deposit {
            amount,
            currency: None,
        }
    }

    fn scope_of(command: &AccountCommand) -> (&'static str, Value) {
        (command.operation(), command.request())
    }

    #[test]
    fn scopes_tell_operations_and_requests_apart() {
        assert_eq!(scope_of(&deposit(5)), scope_of(&deposit(5)));
        assert_ne!(scope_of(&deposit(5)), scope_of(&deposit(6)));
        let withdraw = AccountCommand::Withdraw {
            amount: 5,
            currency: None,
        };
        assert_ne!(scope_of(&deposit(5)), scope_of(&withdraw));
        // The stored records' request format: keys recorded before stay valid.
        assert_eq!(
            scope_of(&deposit(5)),
            ("deposit", json!({"amount": 5, "currency": null}))
        );
        let open = AccountCommand::Open {
            owner: "ann".into(),
            currency: "EUR".into(),
        };
        assert_eq!(
            scope_of(&open),
            ("open", json!({"owner": "ann", "currency": "EUR"}))
        );
        assert_eq!(scope_of(&AccountCommand::Close), ("close", json!({})));
    }

    #[test]
    fn legacy_fingerprints_are_stable() {
        assert_eq!(
            legacy_fingerprint(&deposit(5)),
            legacy_fingerprint(&deposit(5))
        );
        assert_ne!(
            legacy_fingerprint(&deposit(5)),
            legacy_fingerprint(&deposit(6))
        );
        assert_eq!(legacy_fingerprint(&deposit(5)).len(), 16);
        assert_eq!(
            deposit(5).legacy_fingerprint(),
            Some(legacy_fingerprint(&deposit(5)))
        );
    }
}
