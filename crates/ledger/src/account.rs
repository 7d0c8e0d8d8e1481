//! The account aggregate: commands decided purely against state folded from
//! the account's own events (`events.account.<id>`).
//!
//! The events are exactly the ones the read models already know (`opened`,
//! `deposited`, `withdrawn`, `closed`), so `account_balances` and
//! `account_activity` need no change. A transfer debits its source with a
//! `withdrawn` and refunds it with a `deposited`; which transfer caused an
//! event is in the envelope (`ce-correlationid` = transfer id,
//! `ce-causationid` = saga command id), not in the data.

use sluice_events::{Aggregate, Envelope, NewEvent};

use crate::events::{ACCOUNT_CATEGORY, AccountEvent};

/// An account, folded from its events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Account {
    /// `None` until opened.
    opened: Option<Opened>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Opened {
    owner: String,
    currency: String,
    balance: i64,
    closed: bool,
}

/// What callers may ask of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountCommand {
    /// Open it for `owner` in `currency` (three capital letters).
    Open {
        /// Who owns it (1-200 characters).
        owner: String,
        /// e.g. `EUR`.
        currency: String,
    },
    /// Put money in. `currency`, when given, must be the account's.
    Deposit {
        /// Minor units, > 0.
        amount: i64,
        /// The currency the money is in (transfers pass the source's).
        currency: Option<String>,
    },
    /// Take money out; never below zero.
    Withdraw {
        /// Minor units, > 0.
        amount: i64,
        /// The currency the caller expects (transfers pass theirs).
        currency: Option<String>,
    },
    /// Close it; only an empty account can be closed (money is never
    /// stranded on a closed account).
    Close,
}

/// Why an account refused a command. Every variant is permanent: the same
/// command against the same state is refused again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AccountRejection {
    /// `open` on an account that exists.
    #[error("account is already open")]
    AlreadyOpen,
    /// Anything but `open` on an account that was never opened.
    #[error("account does not exist")]
    NotFound,
    /// Anything on a closed account.
    #[error("account is closed")]
    Closed,
    /// Amount zero or negative.
    #[error("amount must be a positive integer of minor units, got {0}")]
    InvalidAmount(i64),
    /// Owner empty or too long.
    #[error("owner must be 1-200 characters")]
    InvalidOwner,
    /// Currency not three capital letters.
    #[error("currency {0:?} is not a 3-letter code like EUR")]
    InvalidCurrency(String),
    /// The money is in another currency than the account.
    #[error("currency mismatch: account is in {account}, amount is in {given}")]
    CurrencyMismatch {
        /// The account's currency.
        account: String,
        /// The command's currency.
        given: String,
    },
    /// Not enough money.
    #[error("insufficient funds: balance {balance}, asked {amount}")]
    InsufficientFunds {
        /// Current balance.
        balance: i64,
        /// Amount asked.
        amount: i64,
    },
    /// The balance would not fit in 64 bits.
    #[error("balance would overflow")]
    Overflow,
    /// `close` with money left.
    #[error("account still holds {0} minor units; withdraw them first")]
    NotEmpty(i64),
}

impl AccountRejection {
    /// A stable name of the rule that refused the command, for clients to
    /// branch on (the HTTP problem's `rule`); the message is for people.
    pub fn rule(&self) -> &'static str {
        match self {
            Self::AlreadyOpen => "account-already-open",
            Self::NotFound => "account-must-exist",
            Self::Closed => "account-must-be-open",
            Self::InvalidAmount(_) => "amount-must-be-positive",
            Self::InvalidOwner => "owner-length",
            Self::InvalidCurrency(_) => "currency-code",
            Self::CurrencyMismatch { .. } => "currency-must-match",
            Self::InsufficientFunds { .. } => "sufficient-funds",
            Self::Overflow => "balance-in-range",
            Self::NotEmpty(_) => "close-only-empty",
        }
    }
}

impl Account {
    /// True once opened (also when closed since).
    pub fn exists(&self) -> bool {
        self.opened.is_some()
    }

    /// True when opened and not closed.
    pub fn is_open(&self) -> bool {
        self.opened.as_ref().is_some_and(|o| !o.closed)
    }

    /// Balance in minor units (0 for an unknown account).
    pub fn balance(&self) -> i64 {
        self.opened.as_ref().map_or(0, |o| o.balance)
    }

    /// The currency, once opened.
    pub fn currency(&self) -> Option<&str> {
        self.opened.as_ref().map(|o| o.currency.as_str())
    }

    /// The owner, once opened.
    pub fn owner(&self) -> Option<&str> {
        self.opened.as_ref().map(|o| o.owner.as_str())
    }

    /// The open account, or why commands other than `open` are refused.
    fn open_account(&self) -> Result<&Opened, AccountRejection> {
        match &self.opened {
            None => Err(AccountRejection::NotFound),
            Some(o) if o.closed => Err(AccountRejection::Closed),
            Some(o) => Ok(o),
        }
    }
}

fn valid_currency(c: &str) -> bool {
    c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase())
}

fn check_money(
    account: &Opened,
    amount: i64,
    currency: Option<&String>,
) -> Result<(), AccountRejection> {
    if amount <= 0 {
        return Err(AccountRejection::InvalidAmount(amount));
    }
    match currency {
        Some(c) if *c != account.currency => Err(AccountRejection::CurrencyMismatch {
            account: account.currency.clone(),
            given: c.clone(),
        }),
        _ => Ok(()),
    }
}

impl Aggregate for Account {
    const CATEGORY: &'static str = ACCOUNT_CATEGORY;
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Rejection = AccountRejection;

    fn decide(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountRejection> {
        match command {
            AccountCommand::Open { owner, currency } => {
                if self.opened.is_some() {
                    return Err(AccountRejection::AlreadyOpen);
                }
                if owner.trim().is_empty() || owner.chars().count() > 200 {
                    return Err(AccountRejection::InvalidOwner);
                }
                if !valid_currency(currency) {
                    return Err(AccountRejection::InvalidCurrency(
                        currency.chars().take(16).collect(),
                    ));
                }
                Ok(vec![AccountEvent::Opened {
                    owner: owner.clone(),
                    currency: currency.clone(),
                }])
            }
            AccountCommand::Deposit { amount, currency } => {
                let account = self.open_account()?;
                check_money(account, *amount, currency.as_ref())?;
                account
                    .balance
                    .checked_add(*amount)
                    .ok_or(AccountRejection::Overflow)?;
                Ok(vec![AccountEvent::Deposited { amount: *amount }])
            }
            AccountCommand::Withdraw { amount, currency } => {
                let account = self.open_account()?;
                check_money(account, *amount, currency.as_ref())?;
                if account.balance < *amount {
                    return Err(AccountRejection::InsufficientFunds {
                        balance: account.balance,
                        amount: *amount,
                    });
                }
                Ok(vec![AccountEvent::Withdrawn { amount: *amount }])
            }
            AccountCommand::Close => {
                let account = self.open_account()?;
                if account.balance != 0 {
                    return Err(AccountRejection::NotEmpty(account.balance));
                }
                Ok(vec![AccountEvent::Closed])
            }
        }
    }

    fn evolve(mut self, event: &AccountEvent) -> Self {
        // Events were decided against this state, so they always fit; the
        // arithmetic saturates rather than panics on a hand-written log.
        match (event, self.opened.as_mut()) {
            (AccountEvent::Opened { owner, currency }, None) => {
                self.opened = Some(Opened {
                    owner: owner.clone(),
                    currency: currency.clone(),
                    balance: 0,
                    closed: false,
                });
            }
            (AccountEvent::Deposited { amount }, Some(o)) => {
                o.balance = o.balance.saturating_add(*amount);
            }
            (AccountEvent::Withdrawn { amount }, Some(o)) => {
                o.balance = o.balance.saturating_sub(*amount);
            }
            (AccountEvent::Closed, Some(o)) => o.closed = true,
            _ => {}
        }
        self
    }

    fn encode(event: &AccountEvent) -> Result<NewEvent, sluice_events::Error> {
        Ok(event.to_new_event().with_source("urn:sluice:ledger"))
    }

    fn decode(envelope: &Envelope) -> Result<AccountEvent, sluice_events::Error> {
        AccountEvent::decode(envelope).map_err(sluice_events::Error::InvalidData)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_testkit::given;

    fn opened() -> AccountEvent {
        AccountEvent::Opened {
            owner: "ann".into(),
            currency: "EUR".into(),
        }
    }

    fn deposit(amount: i64) -> AccountCommand {
        AccountCommand::Deposit {
            amount,
            currency: None,
        }
    }

    fn withdraw(amount: i64) -> AccountCommand {
        AccountCommand::Withdraw {
            amount,
            currency: None,
        }
    }

    #[test]
    fn open_once_with_valid_owner_and_currency() {
        given::<Account>([]).when_then(
            AccountCommand::Open {
                owner: "ann".into(),
                currency: "EUR".into(),
            },
            vec![opened()],
        );
        assert_eq!(
            given::<Account>([opened()]).when_rejected(AccountCommand::Open {
                owner: "bob".into(),
                currency: "EUR".into(),
            }),
            AccountRejection::AlreadyOpen
        );
        let bad = given::<Account>([]).when_rejected(AccountCommand::Open {
            owner: "ann".into(),
            currency: "euro".into(),
        });
        assert!(matches!(bad, AccountRejection::InvalidCurrency(_)));
        let bad = given::<Account>([]).when_rejected(AccountCommand::Open {
            owner: " ".into(),
            currency: "EUR".into(),
        });
        assert_eq!(bad, AccountRejection::InvalidOwner);
    }

    #[test]
    fn deposits_and_withdrawals_never_overdraw() {
        let g = given::<Account>([opened(), AccountEvent::Deposited { amount: 100 }]);
        assert_eq!(g.state().balance(), 100);
        g.when_then(withdraw(100), vec![AccountEvent::Withdrawn { amount: 100 }]);
        assert_eq!(
            g.when_rejected(withdraw(101)),
            AccountRejection::InsufficientFunds {
                balance: 100,
                amount: 101
            }
        );
        g.when_then(deposit(5), vec![AccountEvent::Deposited { amount: 5 }]);
        assert_eq!(
            g.when_rejected(deposit(0)),
            AccountRejection::InvalidAmount(0)
        );
        assert_eq!(
            g.when_rejected(withdraw(-3)),
            AccountRejection::InvalidAmount(-3)
        );
        let full = given::<Account>([opened(), AccountEvent::Deposited { amount: i64::MAX }]);
        assert_eq!(full.when_rejected(deposit(1)), AccountRejection::Overflow);
    }

    #[test]
    fn currencies_must_match() {
        let g = given::<Account>([opened(), AccountEvent::Deposited { amount: 10 }]);
        let usd = Some("USD".to_owned());
        assert!(matches!(
            g.when_rejected(AccountCommand::Deposit {
                amount: 1,
                currency: usd.clone()
            }),
            AccountRejection::CurrencyMismatch { .. }
        ));
        assert!(matches!(
            g.when_rejected(AccountCommand::Withdraw {
                amount: 1,
                currency: usd
            }),
            AccountRejection::CurrencyMismatch { .. }
        ));
        g.when_then(
            AccountCommand::Deposit {
                amount: 1,
                currency: Some("EUR".into()),
            },
            vec![AccountEvent::Deposited { amount: 1 }],
        );
    }

    #[test]
    fn nothing_happens_on_closed_or_unknown_accounts() {
        let closed = given::<Account>([opened(), AccountEvent::Closed]);
        assert!(!closed.state().is_open());
        for cmd in [deposit(1), withdraw(1), AccountCommand::Close] {
            assert_eq!(closed.when_rejected(cmd), AccountRejection::Closed);
        }
        let unknown = given::<Account>([]);
        for cmd in [deposit(1), withdraw(1), AccountCommand::Close] {
            assert_eq!(unknown.when_rejected(cmd), AccountRejection::NotFound);
        }
    }

    #[test]
    fn only_empty_accounts_close() {
        let g = given::<Account>([opened(), AccountEvent::Deposited { amount: 3 }]);
        assert_eq!(
            g.when_rejected(AccountCommand::Close),
            AccountRejection::NotEmpty(3)
        );
        given::<Account>([opened()]).when_then(AccountCommand::Close, vec![AccountEvent::Closed]);
    }

    #[test]
    fn events_round_trip_through_the_envelope_codec() {
        for e in [
            opened(),
            AccountEvent::Deposited { amount: 7 },
            AccountEvent::Withdrawn { amount: 7 },
            AccountEvent::Closed,
        ] {
            let n = Account::encode(&e).unwrap();
            assert_eq!(AccountEvent::decode_parts(&n.event_type, &n.data), Ok(e));
        }
    }
}
