//! The account events: wire names and payloads (`events.account.<id>`).

use serde::{Deserialize, Serialize};
use sluice_events::{Catalog, Envelope, NewEvent};

/// The aggregate category of accounts.
pub const ACCOUNT_CATEGORY: &str = "account";
/// `ledger.account.opened.v1` `{ "owner": string, "currency": "EUR" }`.
pub const OPENED: &str = "ledger.account.opened.v1";
/// `ledger.account.deposited.v1` `{ "amount": integer minor units > 0 }`.
pub const DEPOSITED: &str = "ledger.account.deposited.v1";
/// `ledger.account.withdrawn.v1` `{ "amount": integer minor units > 0 }`.
pub const WITHDRAWN: &str = "ledger.account.withdrawn.v1";
/// `ledger.account.closed.v1` `{}`.
pub const CLOSED: &str = "ledger.account.closed.v1";

/// The account events' JSON Schemas (`crates/ledger/schemas/<type>.json`),
/// by wire name.
const SCHEMAS: [(&str, &str); 4] = [
    (
        OPENED,
        include_str!("../schemas/ledger.account.opened.v1.json"),
    ),
    (
        DEPOSITED,
        include_str!("../schemas/ledger.account.deposited.v1.json"),
    ),
    (
        WITHDRAWN,
        include_str!("../schemas/ledger.account.withdrawn.v1.json"),
    ),
    (
        CLOSED,
        include_str!("../schemas/ledger.account.closed.v1.json"),
    ),
];

/// What the ledger writes, for the public append's checks: the `account`
/// category with every `ledger.account.*` type and its schema (compiled
/// here, once per call: build it at start-up and share it).
pub fn catalog() -> Result<Catalog, sluice_events::Error> {
    SCHEMAS.iter().try_fold(Catalog::new(), |c, (t, schema)| {
        c.declare(ACCOUNT_CATEGORY, t, schema)
    })
}

/// An account event, decoded and validated on its own (without state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountEvent {
    /// The account was opened.
    Opened {
        /// Who owns it.
        owner: String,
        /// ISO 4217-like code: three ASCII capital letters.
        currency: String,
    },
    /// Money came in (minor units, > 0).
    Deposited {
        /// Amount in minor units.
        amount: i64,
    },
    /// Money went out (minor units, > 0).
    Withdrawn {
        /// Amount in minor units.
        amount: i64,
    },
    /// The account was closed.
    Closed,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenedData {
    owner: String,
    currency: String,
}

#[derive(Serialize, Deserialize)]
struct AmountData {
    // Read as a JSON number first: `1.5` or `"10"` must be a clear rejection.
    amount: serde_json::Number,
}

impl AccountEvent {
    /// The wire name.
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::Opened { .. } => OPENED,
            Self::Deposited { .. } => DEPOSITED,
            Self::Withdrawn { .. } => WITHDRAWN,
            Self::Closed => CLOSED,
        }
    }

    /// The amount moved, if any (withdrawals negative? no: as written).
    pub fn amount(&self) -> Option<i64> {
        match self {
            Self::Deposited { amount } | Self::Withdrawn { amount } => Some(*amount),
            _ => None,
        }
    }

    /// The event as a [`NewEvent`] to append.
    pub fn to_new_event(&self) -> NewEvent {
        let data = match self {
            Self::Opened { owner, currency } => {
                serde_json::json!({ "owner": owner, "currency": currency })
            }
            Self::Deposited { amount } | Self::Withdrawn { amount } => {
                serde_json::json!({ "amount": amount })
            }
            Self::Closed => serde_json::json!({}),
        };
        NewEvent::new(self.event_type(), data.to_string().into_bytes())
    }

    /// Decodes and validates an envelope's type and data. The error is the
    /// dead-letter reason.
    pub fn decode(envelope: &Envelope) -> Result<Self, String> {
        Self::decode_parts(&envelope.event_type, &envelope.data)
    }

    /// Decodes a type and JSON data.
    pub fn decode_parts(event_type: &str, data: &[u8]) -> Result<Self, String> {
        match event_type {
            OPENED => {
                let d: OpenedData = serde_json::from_slice(data)
                    .map_err(|e| format!("malformed {OPENED} data: {e}"))?;
                if d.owner.trim().is_empty() || d.owner.chars().count() > 200 {
                    return Err("owner must be 1-200 characters".to_owned());
                }
                if d.currency.len() != 3 || !d.currency.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(format!(
                        "currency {:?} is not a 3-letter code like EUR",
                        d.currency.chars().take(16).collect::<String>()
                    ));
                }
                Ok(Self::Opened {
                    owner: d.owner,
                    currency: d.currency,
                })
            }
            DEPOSITED | WITHDRAWN => {
                let d: AmountData = serde_json::from_slice(data)
                    .map_err(|e| format!("malformed {event_type} data: {e}"))?;
                let amount = d.amount.as_i64().ok_or_else(|| {
                    format!("amount {} is not an integer of minor units", d.amount)
                })?;
                if amount <= 0 {
                    return Err(format!("amount must be > 0, got {amount}"));
                }
                Ok(if event_type == DEPOSITED {
                    Self::Deposited { amount }
                } else {
                    Self::Withdrawn { amount }
                })
            }
            CLOSED => {
                let v: serde_json::Value = serde_json::from_slice(data)
                    .map_err(|e| format!("malformed {CLOSED} data: {e}"))?;
                if !v.is_object() {
                    return Err(format!("{CLOSED} data must be a JSON object"));
                }
                Ok(Self::Closed)
            }
            other => Err(format!(
                "unknown event type {:?} for an account",
                other.chars().take(64).collect::<String>()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_are_pinned() {
        // Renaming one breaks stored history.
        assert_eq!(OPENED, "ledger.account.opened.v1");
        assert_eq!(DEPOSITED, "ledger.account.deposited.v1");
        assert_eq!(WITHDRAWN, "ledger.account.withdrawn.v1");
        assert_eq!(CLOSED, "ledger.account.closed.v1");
    }

    #[test]
    fn the_schemas_accept_what_the_ledger_writes_and_refuse_what_it_cannot_read() {
        let catalog = catalog().unwrap();
        let stream = sluice_events::StreamId::new(ACCOUNT_CATEGORY, "a-1").unwrap();
        let check =
            |t: &str, d: &str| catalog.check(&stream, 0, &NewEvent::new(t, d.as_bytes().to_vec()));
        for e in [
            AccountEvent::Opened {
                owner: "ann".into(),
                currency: "EUR".into(),
            },
            AccountEvent::Opened {
                owner: "é".repeat(200),
                currency: "EUR".into(),
            },
            AccountEvent::Deposited { amount: 5 },
            AccountEvent::Withdrawn { amount: i64::MAX },
            AccountEvent::Closed,
        ] {
            let n = e.to_new_event();
            check(&n.event_type, std::str::from_utf8(&n.data).unwrap()).unwrap();
            assert_eq!(AccountEvent::decode_parts(&n.event_type, &n.data), Ok(e));
        }
        for (t, d) in [
            (DEPOSITED, r#"{"amount": -5}"#),
            (DEPOSITED, r#"{"amount": 0}"#),
            (DEPOSITED, r#"{"amount": 1.5}"#),
            (DEPOSITED, r#"{"amount": 5.0}"#),
            (DEPOSITED, r#"{"amount": "10"}"#),
            (DEPOSITED, r#"{"amount": 9223372036854775808}"#),
            (WITHDRAWN, r#"{}"#),
            (OPENED, r#"{"owner": "a", "currency": "euro"}"#),
            (OPENED, r#"{"owner": " ", "currency": "EUR"}"#),
            (OPENED, r#"[1]"#),
            (CLOSED, "3"),
            ("ledger.account.frozen.v1", "{}"),
        ] {
            // Whatever the decoder cannot read, the schema refuses first.
            assert!(
                AccountEvent::decode_parts(t, d.as_bytes()).is_err(),
                "{t} {d}"
            );
            let err = check(t, d).expect_err(d);
            assert!(err.is_refused_by_catalog(), "{t} {d}: {err}");
        }
    }

    #[test]
    fn round_trip_and_rejections() {
        for e in [
            AccountEvent::Opened {
                owner: "ann".into(),
                currency: "EUR".into(),
            },
            AccountEvent::Deposited { amount: 5 },
            AccountEvent::Withdrawn { amount: 7 },
            AccountEvent::Closed,
        ] {
            let n = e.to_new_event();
            assert_eq!(AccountEvent::decode_parts(&n.event_type, &n.data), Ok(e));
        }
        let bad = [
            (DEPOSITED, r#"{"amount": -5}"#, "> 0"),
            (DEPOSITED, r#"{"amount": 0}"#, "> 0"),
            (DEPOSITED, r#"{"amount": 1.5}"#, "integer"),
            (DEPOSITED, r#"{"amount": "10"}"#, "malformed"),
            (WITHDRAWN, r#"{}"#, "malformed"),
            (OPENED, r#"{"owner": "a", "currency": "euro"}"#, "3-letter"),
            (OPENED, r#"[1]"#, "malformed"),
            ("ledger.account.frozen.v1", "{}", "unknown event type"),
            (CLOSED, "3", "object"),
        ];
        for (t, d, want) in bad {
            let err = AccountEvent::decode_parts(t, d.as_bytes()).expect_err(d);
            assert!(err.contains(want), "{t} {d}: {err}");
        }
    }
}
