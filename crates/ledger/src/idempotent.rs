//! Account commands from the outside world (HTTP, CLI) with an optional
//! idempotency key: the same key with the same command takes effect once and
//! answers the same; the same key with another command is refused.
//!
//! No extra store: the key and a fingerprint of the command become the ids of
//! the events it appends (`idem-<key>-<fingerprint>-<n>`), so the account's
//! own log says whether a key was used, for what, and where it landed —
//! beyond the server's 2-minute dedup window too.

use serde::Serialize;
use sluice_events::{Aggregate, EventId, EventStore, ExpectedVersion, StreamId, validate_token};

use crate::Error;
use crate::account::{Account, AccountCommand};
use crate::events::ACCOUNT_CATEGORY;

/// Where an account command landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandOutcome {
    /// The account.
    pub account: String,
    /// Positions of the events it appended (empty for a no-op).
    pub positions: Vec<u64>,
    /// The account's version after it (pass as `min_position`).
    pub version: u64,
    /// True when an earlier request with the same key had already done it.
    pub replayed: bool,
}

/// FNV-1a over the command's canonical text: stable across processes.
fn fingerprint(command: &AccountCommand) -> String {
    let text = format!("{command:?}");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Runs `command` on account `id` (load → decide → append, reloading on a
/// conflict), once per `key` when one is given.
pub async fn account_command(
    store: &EventStore,
    id: &str,
    command: &AccountCommand,
    key: Option<&str>,
) -> Result<CommandOutcome, Error> {
    let stream = StreamId::new(ACCOUNT_CATEGORY, id)?;
    if let Some(k) = key {
        validate_token("idempotency key", k)?;
        if k.len() > 64 {
            return Err(Error::Events(sluice_events::Error::InvalidToken {
                what: "idempotency key",
                value: k.chars().take(70).collect(),
                reason: "it is longer than 64 characters",
            }));
        }
    }
    let prefix = key.map(|k| format!("idem-{k}-"));
    let mine = key.map(|k| format!("idem-{k}-{}-", fingerprint(command)));
    for _ in 0..10 {
        let mut state = Account::default();
        let mut earlier = Vec::new();
        let history = store.history(&stream).await?;
        let version = history.version;
        for recorded in &history.events {
            let id = recorded.envelope.id.as_str();
            if let Some(p) = &prefix
                && id.starts_with(p.as_str())
            {
                if mine.as_deref().is_some_and(|m| id.starts_with(m)) {
                    earlier.push(recorded.position);
                } else {
                    return Err(Error::IdempotencyKeyReused(
                        key.unwrap_or_default().to_owned(),
                    ));
                }
            }
            let event = recorded.decoded(Account::decode(&recorded.envelope))?;
            state = state.evolve(&event);
        }
        if !earlier.is_empty() {
            return Ok(CommandOutcome {
                account: id.to_owned(),
                version: *earlier.last().unwrap_or(&version),
                positions: earlier,
                replayed: true,
            });
        }
        let decided = state.decide(command).map_err(Error::Rejected)?;
        if decided.is_empty() {
            return Ok(CommandOutcome {
                account: id.to_owned(),
                positions: vec![],
                version,
                replayed: false,
            });
        }
        let mut new = Vec::with_capacity(decided.len());
        for (i, e) in decided.iter().enumerate() {
            let mut ev = Account::encode(e)?;
            if let Some(m) = &mine {
                ev = ev.with_id(EventId::parse(&format!("{m}{i}"))?);
            }
            new.push(ev);
        }
        match store
            .append(&stream, ExpectedVersion::from_version(version), new)
            .await
        {
            Ok(r) => {
                return Ok(CommandOutcome {
                    account: id.to_owned(),
                    positions: r.positions,
                    version: r.version,
                    replayed: r.deduplicated,
                });
            }
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Events(sluice_events::Error::Timeout(
        std::time::Duration::ZERO,
    )))
}

/// The account's current state and version, folded from its log.
pub async fn account_state(store: &EventStore, id: &str) -> Result<(Account, u64), Error> {
    let stream = StreamId::new(ACCOUNT_CATEGORY, id)?;
    Ok(sluice_events::load::<Account>(store, &stream).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_tell_commands_apart_and_are_stable() {
        let d5 = AccountCommand::Deposit {
            amount: 5,
            currency: None,
        };
        let d6 = AccountCommand::Deposit {
            amount: 6,
            currency: None,
        };
        assert_eq!(fingerprint(&d5), fingerprint(&d5.clone()));
        assert_ne!(fingerprint(&d5), fingerprint(&d6));
        assert_eq!(fingerprint(&d5).len(), 16);
    }
}
