//! The pure part of the ledger read models: fold a batch of account events
//! onto the current rows. No SQL here, so it is tested without a database.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::events::AccountEvent;

/// `account_balances.status` of an open account.
pub const STATUS_OPEN: &str = "open";
/// `account_balances.status` of a closed account.
pub const STATUS_CLOSED: &str = "closed";

/// One row of `account_balances`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccountRow {
    /// Account id (the aggregate id).
    pub id: String,
    /// Owner.
    pub owner: String,
    /// Currency code.
    pub currency: String,
    /// Balance in minor units.
    pub balance: i64,
    /// Position of the last event applied to the account.
    pub version: u64,
    /// `open` or `closed`.
    pub status: String,
    /// Time of the last event applied (RFC 3339).
    pub updated_at: String,
}

/// One account event of a batch, as the fold sees it.
#[derive(Debug, Clone)]
pub struct FoldInput<'a> {
    /// Stream sequence.
    pub position: u64,
    /// Account id.
    pub account: &'a str,
    /// Event time (RFC 3339).
    pub time: &'a str,
    /// The decoded event, or why it could not be decoded.
    pub event: Result<AccountEvent, String>,
}

/// The result of folding a batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FoldOutput {
    /// The rows that changed, in their final state for this batch.
    pub changed: BTreeMap<String, AccountRow>,
    /// Events that make no sense: (position, reason).
    pub rejected: Vec<(u64, String)>,
}

/// Folds `events` (log order) onto `existing` rows of the accounts they touch.
///
/// Rules (what makes sense for a balance): open once; deposit, withdraw and
/// close only an open account; amounts > 0; no overdraft; no overflow. After
/// an account's first rejected event its later events in the batch are left
/// out (the runtime parks them behind the rejected one).
pub fn fold_balances(
    existing: &BTreeMap<String, AccountRow>,
    events: &[FoldInput<'_>],
) -> FoldOutput {
    let mut out = FoldOutput::default();
    let mut broken: HashSet<&str> = HashSet::new();
    for input in events {
        if broken.contains(input.account) {
            continue;
        }
        let current = out
            .changed
            .get(input.account)
            .or_else(|| existing.get(input.account));
        match evolve(current, input) {
            Ok(row) => {
                out.changed.insert(row.id.clone(), row);
            }
            Err(reason) => {
                broken.insert(input.account);
                out.rejected.push((input.position, reason));
            }
        }
    }
    out
}

/// One event onto one row.
fn evolve(current: Option<&AccountRow>, input: &FoldInput<'_>) -> Result<AccountRow, String> {
    let event = input.event.as_ref().map_err(Clone::clone)?;
    let touch = |row: &AccountRow| AccountRow {
        version: input.position,
        updated_at: input.time.to_owned(),
        ..row.clone()
    };
    match (event, current) {
        (AccountEvent::Opened { owner, currency }, None) => Ok(AccountRow {
            id: input.account.to_owned(),
            owner: owner.clone(),
            currency: currency.clone(),
            balance: 0,
            version: input.position,
            status: STATUS_OPEN.to_owned(),
            updated_at: input.time.to_owned(),
        }),
        (AccountEvent::Opened { .. }, Some(_)) => {
            Err(format!("account {} is already open", input.account))
        }
        (_, None) => Err(format!(
            "{} for unknown account {}",
            event.event_type(),
            input.account
        )),
        (_, Some(row)) if row.status != STATUS_OPEN => Err(format!(
            "{} for closed account {}",
            event.event_type(),
            input.account
        )),
        (AccountEvent::Deposited { amount }, Some(row)) => {
            let balance = row
                .balance
                .checked_add(*amount)
                .ok_or_else(|| format!("deposit of {amount} overflows the balance"))?;
            Ok(AccountRow {
                balance,
                ..touch(row)
            })
        }
        (AccountEvent::Withdrawn { amount }, Some(row)) => {
            if *amount > row.balance {
                return Err(format!(
                    "withdrawal of {amount} exceeds the balance of {}",
                    row.balance
                ));
            }
            Ok(AccountRow {
                balance: row.balance - amount,
                ..touch(row)
            })
        }
        (AccountEvent::Closed, Some(row)) => Ok(AccountRow {
            status: STATUS_CLOSED.to_owned(),
            ..touch(row)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(position: u64, account: &'static str, event: AccountEvent) -> FoldInput<'static> {
        FoldInput {
            position,
            account,
            time: "2026-11-25T12:00:00Z",
            event: Ok(event),
        }
    }

    fn opened() -> AccountEvent {
        AccountEvent::Opened {
            owner: "ann".into(),
            currency: "EUR".into(),
        }
    }

    #[test]
    fn given_no_rows_when_open_deposit_withdraw_then_balance_is_the_fold() {
        let out = fold_balances(
            &BTreeMap::new(),
            &[
                ev(1, "a", opened()),
                ev(2, "a", AccountEvent::Deposited { amount: 100 }),
                ev(3, "b", opened()),
                ev(4, "a", AccountEvent::Withdrawn { amount: 30 }),
            ],
        );
        assert!(out.rejected.is_empty());
        assert_eq!(out.changed["a"].balance, 70);
        assert_eq!(out.changed["a"].version, 4);
        assert_eq!(out.changed["b"].balance, 0);
        assert_eq!(out.changed["b"].version, 3);
    }

    #[test]
    fn given_existing_row_when_deposit_then_it_adds_to_it() {
        let mut existing = BTreeMap::new();
        let first = fold_balances(&BTreeMap::new(), &[ev(1, "a", opened())]);
        existing.insert("a".to_owned(), first.changed["a"].clone());
        let out = fold_balances(
            &existing,
            &[ev(9, "a", AccountEvent::Deposited { amount: 5 })],
        );
        assert_eq!(out.changed["a"].balance, 5);
        assert_eq!(out.changed["a"].owner, "ann");
    }

    #[test]
    fn nonsense_is_rejected_and_later_events_of_that_account_are_left_out() {
        let out = fold_balances(
            &BTreeMap::new(),
            &[
                ev(1, "x", AccountEvent::Deposited { amount: 5 }),
                ev(2, "a", opened()),
                ev(3, "x", opened()),
                ev(4, "a", AccountEvent::Withdrawn { amount: 1 }),
                ev(5, "a", AccountEvent::Deposited { amount: 1 }),
                ev(6, "b", opened()),
                ev(7, "b", AccountEvent::Closed),
                ev(8, "b", AccountEvent::Deposited { amount: 1 }),
                ev(9, "c", opened()),
                ev(10, "c", opened()),
                FoldInput {
                    position: 11,
                    account: "d",
                    time: "t",
                    event: Err("malformed".into()),
                },
            ],
        );
        let positions: Vec<u64> = out.rejected.iter().map(|r| r.0).collect();
        assert_eq!(positions, vec![1, 4, 8, 10, 11]);
        assert!(out.rejected[0].1.contains("unknown account"));
        assert!(out.rejected[1].1.contains("exceeds the balance"));
        assert!(out.rejected[2].1.contains("closed account"));
        assert!(out.rejected[3].1.contains("already open"));
        // x: its open after the rejected deposit is left out (parked).
        assert!(!out.changed.contains_key("x"));
        // a: the deposit after the rejected withdrawal is left out too.
        assert_eq!(out.changed["a"].balance, 0);
        assert_eq!(out.changed["a"].version, 2);
        assert_eq!(out.changed["b"].status, STATUS_CLOSED);
    }

    #[test]
    fn overflow_is_rejected() {
        let out = fold_balances(
            &BTreeMap::new(),
            &[
                ev(1, "a", opened()),
                ev(2, "a", AccountEvent::Deposited { amount: i64::MAX }),
                ev(3, "a", AccountEvent::Deposited { amount: 1 }),
            ],
        );
        assert_eq!(out.rejected.len(), 1);
        assert_eq!(out.rejected[0].0, 3);
    }
}
