//! Commands from the outside world (HTTP, CLI) with an optional
//! idempotency key, for any [`Aggregate`]: a repeat of the same request
//! takes effect once and answers with the first response; the key used for
//! anything else is refused, loudly. A domain opts in by describing its
//! command ([`IdempotentCommand`]) and calling [`execute_keyed`].
//!
//! Semantics (see `docs/contract.md`, "Idempotency keys"):
//! - A key is recorded in the JetStream KV bucket [`IDEMPOTENCY_BUCKET`],
//!   durable and kept for the configured retention (default 24 h), so a
//!   repeat is recognised after restarts and long after the log's
//!   duplicate window. Keys match exactly, never by prefix.
//! - The record binds the key to its resource (`<category>/<id>`),
//!   operation (`open`, `deposit`, ...) and request (the command's fields),
//!   and to the first response (where the events landed). A repeat with all
//!   three equal answers that response again, marked `replayed`; the key
//!   with another resource, operation or request is
//!   [`Error::IdempotencyKeyReused`], naming the first use. So of two writes
//!   to two aggregates under one key the second is refused, never dropped.
//! - A request in progress holds its key for a short lease: a concurrent
//!   repeat waits for its answer, then gets [`Error::IdempotencyInProgress`].
//!   A holder that died loses the key when the lease ends.
//! - A refused command (the aggregate said no) writes nothing and releases
//!   its key: a repeat is decided again.
//! - Exactly once does not rest on the record alone: the events a keyed
//!   command appends carry ids derived from its record (`idem-<attempt>-<n>`),
//!   the aggregate's log is checked for them before deciding, and the append
//!   is optimistic. Whoever finishes a request (its first holder, or one
//!   that took over after a crash) finds an earlier try's events instead of
//!   appending them twice.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::aggregate::{Aggregate, ExecuteError, run};
use crate::error::Error;
use crate::ids::{EventId, StreamId, validate_token};
use crate::store::{EventStore, RecordedEvent};

/// KV bucket of idempotency records, one per key.
pub const IDEMPOTENCY_BUCKET: &str = "SLUICE_IDEMPOTENCY";
/// How long a key is remembered by default: a day, as payment APIs do.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest idempotency key.
const MAX_KEY_LEN: usize = 64;

/// Settings of the idempotency records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyConfig {
    /// How long a key is remembered after its last use (the bucket's
    /// `max_age`); a repeat after that is a new request.
    pub retention: Duration,
    /// Replicas of the bucket (as the event stream's).
    pub replicas: usize,
    /// How long a request holds its key while it runs; a holder that died
    /// loses it after this.
    pub lease: Duration,
    /// How long a concurrent repeat waits for the request holding the key
    /// before [`Error::IdempotencyInProgress`].
    pub wait: Duration,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            retention: DEFAULT_RETENTION,
            replicas: 1,
            lease: Duration::from_secs(15),
            wait: Duration::from_secs(5),
        }
    }
}

/// The idempotency records: a handle on their KV bucket. Cheap to clone.
#[derive(Clone)]
pub struct Idempotency {
    kv: kv::Store,
    config: IdempotencyConfig,
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("bucket", &IDEMPOTENCY_BUCKET)
            .field("config", &self.config)
            .finish()
    }
}

fn kv_error(what: &'static str, e: impl std::fmt::Display) -> Error {
    Error::Idempotency(format!("{what}: {e}"))
}

impl Idempotency {
    /// Opens the bucket, creating it, or setting its retention to the
    /// configured one when it differs (`sluice up`/`serve` and provisioning).
    pub async fn open(store: &EventStore, config: IdempotencyConfig) -> Result<Self, Error> {
        let js = store.jetstream();
        if config.retention.is_zero() {
            return Err(Error::Idempotency(
                "the idempotency retention must be > 0".to_owned(),
            ));
        }
        let kv = match js.get_key_value(IDEMPOTENCY_BUCKET).await {
            Ok(kv) => {
                let stream_name = format!("KV_{IDEMPOTENCY_BUCKET}");
                let mut stream = js
                    .get_stream(&stream_name)
                    .await
                    .map_err(|e| kv_error("reading the idempotency bucket", e))?;
                let info = stream
                    .info()
                    .await
                    .map_err(|e| kv_error("reading the idempotency bucket", e))?;
                if info.config.max_age != config.retention {
                    tracing::info!(retention = ?config.retention, was = ?info.config.max_age, "updating the idempotency retention");
                    let mut updated = info.config.clone();
                    updated.max_age = config.retention;
                    // A least-privilege user may not change streams: the
                    // keys still work, with the retention provisioning set.
                    if let Err(e) = js.update_stream(updated).await {
                        tracing::warn!(error = %e, "could not set the idempotency retention; run `sluice serve --provision-only` with the admin user");
                    }
                }
                kv
            }
            Err(_) => Self::create(js, &config).await?,
        };
        Ok(Self { kv, config })
    }

    /// Opens the bucket as it is, creating it with `config` only when it
    /// does not exist (one-off commands such as `sluice ledger`, which must
    /// not change the retention the service set).
    pub async fn open_existing(
        store: &EventStore,
        config: IdempotencyConfig,
    ) -> Result<Self, Error> {
        let js = store.jetstream();
        let kv = match js.get_key_value(IDEMPOTENCY_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => Self::create(js, &config).await?,
        };
        Ok(Self { kv, config })
    }

    async fn create(
        js: &jetstream::Context,
        config: &IdempotencyConfig,
    ) -> Result<kv::Store, Error> {
        let created = js
            .create_key_value(kv::Config {
                bucket: IDEMPOTENCY_BUCKET.to_owned(),
                description:
                    "Sluice idempotency keys: resource, operation, request and first response"
                        .to_owned(),
                history: 1,
                max_age: config.retention,
                storage: jetstream::stream::StorageType::File,
                num_replicas: config.replicas,
                ..Default::default()
            })
            .await;
        match created {
            Ok(kv) => Ok(kv),
            // Another process created it first.
            Err(e) => js
                .get_key_value(IDEMPOTENCY_BUCKET)
                .await
                .map_err(|_| kv_error("creating the idempotency bucket (this needs the admin user; run `sluice serve --provision-only`)", e)),
        }
    }

    /// The settings in use.
    pub fn config(&self) -> &IdempotencyConfig {
        &self.config
    }

    /// Claims `key` for `scope`: a fresh record, the recorded first
    /// response, or a takeover of a request whose holder died.
    async fn begin(&self, key: &str, scope: &Scope) -> Result<Begin, Error> {
        let deadline = tokio::time::Instant::now() + self.config.wait;
        let mut pause = Duration::from_millis(20);
        loop {
            let entry = self
                .kv
                .entry(key)
                .await
                .map_err(|e| kv_error("reading an idempotency key", e))?;
            let live = entry.filter(|e| e.operation == kv::Operation::Put);
            let Some(entry) = live else {
                let record = Record::pending(scope, new_attempt(), self.lease_until());
                match self.kv.create(key, record.to_bytes()?).await {
                    Ok(revision) => return Ok(Begin::Run { revision, record }),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(kv_error("recording an idempotency key", e)),
                }
            };
            let record = Record::from_bytes(&entry.value)?;
            if !record.matches(scope) {
                return Err(Error::IdempotencyKeyReused {
                    key: key.to_owned(),
                    first_use: record.describe(),
                });
            }
            if let Some(applied) = record.applied.clone() {
                return Ok(Begin::Done(applied));
            }
            if record.lease_until_ms <= now_ms() {
                // Its holder died or gave up: take over with the same
                // attempt, so its events are recognised if they landed.
                let mut taken = record;
                taken.lease_until_ms = self.lease_until();
                match self.kv.update(key, taken.to_bytes()?, entry.revision).await {
                    Ok(revision) => {
                        tracing::info!(
                            key,
                            "taking over an idempotent request whose holder stopped"
                        );
                        return Ok(Begin::Run {
                            revision,
                            record: taken,
                        });
                    }
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                    Err(e) => return Err(kv_error("taking over an idempotency key", e)),
                }
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(Error::IdempotencyInProgress(key.to_owned()));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }

    /// Records the first response; best effort: if this fails, the record
    /// stays pending and the next repeat finds the events in the log.
    async fn complete(&self, key: &str, revision: u64, mut record: Record, applied: Applied) {
        record.applied = Some(applied);
        if let Err(e) = self.put_back(key, revision, record).await {
            tracing::warn!(key, error = %e, "could not record the response of an idempotent request; a repeat finds its events in the log");
        }
    }

    /// Lets go of the key after a refusal (nothing written: a repeat is
    /// decided again) or a failure (a repeat takes over at once). The record
    /// keeps its scope and attempt, so whatever a try left in the log is
    /// still recognised.
    async fn release(&self, key: &str, revision: u64, record: Record) {
        if let Err(e) = self.put_back(key, revision, record).await {
            tracing::debug!(key, error = %e, "could not release an idempotency key; it frees itself when its lease ends");
        }
    }

    /// Writes the record back with its lease ended, if it is still at
    /// `revision`.
    async fn put_back(&self, key: &str, revision: u64, mut record: Record) -> Result<(), String> {
        record.lease_until_ms = 0;
        let bytes = record.to_bytes().map_err(|e| e.to_string())?;
        self.kv
            .update(key, bytes, revision)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn lease_until(&self) -> u64 {
        now_ms().saturating_add(u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn new_attempt() -> String {
    format!("idem-{}", uuid_simple())
}

fn uuid_simple() -> String {
    // EventId::new is a UUIDv7 with dashes; the attempt only needs to be unique.
    EventId::new().as_str().replace('-', "")
}

/// What a keyed command tells its idempotency record: the key is bound to
/// the aggregate, [`operation`](Self::operation) and
/// [`request`](Self::request), so the same key with anything else is
/// refused.
pub trait IdempotentCommand {
    /// The operation's name, e.g. `deposit`.
    fn operation(&self) -> &'static str;
    /// The request: the command's fields as JSON, compared by value (so a
    /// body's formatting does not matter). Part of the stored record: keep
    /// it stable, or keys recorded before a change stop matching.
    fn request(&self) -> Value;
    /// For a domain whose keyed events once carried ids
    /// `idem-<key>-<fingerprint>-<n>` (before the records existed): this
    /// command's fingerprint, so such events are still recognised as this
    /// request's (or refused as another's). `None` (the default) otherwise.
    fn legacy_fingerprint(&self) -> Option<String> {
        None
    }
}

/// What a keyed request is about: the key is bound to all three.
#[derive(Debug, Clone, PartialEq)]
struct Scope {
    resource: String,
    operation: &'static str,
    request: Value,
}

impl Scope {
    fn of<C: IdempotentCommand + ?Sized>(stream: &StreamId, command: &C) -> Self {
        Self {
            resource: format!("{}/{}", stream.category(), stream.id()),
            operation: command.operation(),
            request: command.request(),
        }
    }
}

/// Where a keyed request's events landed: its first response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Applied {
    positions: Vec<u64>,
    version: u64,
}

/// One key's record in the bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    resource: String,
    operation: String,
    request: Value,
    /// Base of the ids of the events this request appends.
    attempt: String,
    /// When the key was first used (Unix ms).
    created_ms: u64,
    /// While no response is recorded: until when the holder owns the key.
    #[serde(default)]
    lease_until_ms: u64,
    /// The first response, once there is one.
    #[serde(default)]
    applied: Option<Applied>,
}

impl Record {
    fn pending(scope: &Scope, attempt: String, lease_until_ms: u64) -> Self {
        Self {
            resource: scope.resource.clone(),
            operation: scope.operation.to_owned(),
            request: scope.request.clone(),
            attempt,
            created_ms: now_ms(),
            lease_until_ms,
            applied: None,
        }
    }

    fn matches(&self, scope: &Scope) -> bool {
        self.resource == scope.resource
            && self.operation == scope.operation
            && self.request == scope.request
    }

    fn describe(&self) -> String {
        let when = time::OffsetDateTime::from_unix_timestamp_nanos(
            i128::from(self.created_ms) * 1_000_000,
        )
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "an earlier time".to_owned());
        format!(
            "{} on {} {} at {when}",
            self.operation, self.resource, self.request
        )
    }

    fn to_bytes(&self) -> Result<Bytes, Error> {
        serde_json::to_vec(self)
            .map(Bytes::from)
            .map_err(|e| kv_error("encoding an idempotency record", e))
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        serde_json::from_slice(bytes).map_err(|e| kv_error("decoding an idempotency record", e))
    }
}

enum Begin {
    /// This request runs, with a record it created or took over.
    Run { revision: u64, record: Record },
    /// An earlier request with this key and scope was applied.
    Done(Applied),
}

/// Where a command landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandOutcome {
    /// Positions of the events it appended (empty for a no-op).
    pub positions: Vec<u64>,
    /// The aggregate's version after it (pass as `min_position`).
    pub version: u64,
    /// True when an earlier request with the same key had already done it:
    /// this is the first response again.
    pub replayed: bool,
}

/// Checks an idempotency key: 1-64 letters, digits, `_` or `-`.
pub fn validate_idempotency_key(key: &str) -> Result<(), Error> {
    validate_token("idempotency key", key)?;
    if key.len() > MAX_KEY_LEN {
        return Err(Error::InvalidToken {
            what: "idempotency key",
            value: key.chars().take(70).collect(),
            reason: "it is longer than 64 characters",
        });
    }
    Ok(())
}

/// Conflicts a keyed command rides out before giving up.
const MAX_ATTEMPTS: usize = 10;

/// Runs `command` on aggregate `id` of `A` (load → decide → append,
/// reloading on a conflict, as [`execute`](crate::execute)); with `keyed`,
/// once per key (see the module docs).
pub async fn execute_keyed<A>(
    store: &EventStore,
    id: &str,
    command: &A::Command,
    keyed: Option<(&Idempotency, &str)>,
) -> Result<CommandOutcome, ExecuteError<A::Rejection>>
where
    A: Aggregate,
    A::Command: IdempotentCommand,
{
    let stream = StreamId::new(A::CATEGORY, id)?;
    let Some((keys, key)) = keyed else {
        return outcome_of::<A>(store, &stream, command, None).await;
    };
    validate_idempotency_key(key)?;
    let scope = Scope::of(&stream, command);
    let (revision, record) = match keys.begin(key, &scope).await? {
        Begin::Done(applied) => {
            return Ok(CommandOutcome {
                positions: applied.positions,
                version: applied.version,
                replayed: true,
            });
        }
        Begin::Run { revision, record } => (revision, record),
    };
    let attempt = Attempt {
        base: record.attempt.clone(),
        legacy: command
            .legacy_fingerprint()
            .map(|fingerprint| Legacy { key, fingerprint }),
    };
    match outcome_of::<A>(store, &stream, command, Some(&attempt)).await {
        Ok(outcome) => {
            let applied = Applied {
                positions: outcome.positions.clone(),
                version: outcome.version,
            };
            keys.complete(key, revision, record, applied).await;
            Ok(outcome)
        }
        Err(e) => {
            keys.release(key, revision, record).await;
            Err(e)
        }
    }
}

async fn outcome_of<A: Aggregate>(
    store: &EventStore,
    stream: &StreamId,
    command: &A::Command,
    attempt: Option<&Attempt<'_>>,
) -> Result<CommandOutcome, ExecuteError<A::Rejection>> {
    let (outcome, replayed) = run::<A>(store, stream, command, MAX_ATTEMPTS, attempt).await?;
    Ok(CommandOutcome {
        positions: outcome.positions,
        version: outcome.version,
        replayed,
    })
}

/// The ids a keyed request's events carry, and how an earlier try is
/// recognised in the aggregate's log.
pub(crate) struct Attempt<'a> {
    /// Events get `<base>-<n>`.
    base: String,
    /// Keys used before the records existed: events `idem-<key>-<fp>-<n>`.
    legacy: Option<Legacy<'a>>,
}

struct Legacy<'a> {
    key: &'a str,
    fingerprint: String,
}

/// What an event id says about a keyed request.
#[derive(Debug, PartialEq, Eq)]
enum Mark {
    /// An event of this request (an earlier try that landed).
    Ours,
    /// Of this key, for another request (a legacy id).
    OtherRequest,
    /// Unrelated.
    None,
}

impl Attempt<'_> {
    /// The id of the request's `n`-th event.
    pub(crate) fn event_id(&self, n: usize) -> Result<EventId, Error> {
        EventId::parse(&format!("{}-{n}", self.base))
    }

    /// True when `recorded` is an event of this request (an earlier try
    /// that landed); an event of this key for another request (a legacy
    /// id) is [`Error::IdempotencyKeyReused`].
    pub(crate) fn is_ours(
        &self,
        stream: &StreamId,
        recorded: &RecordedEvent,
    ) -> Result<bool, Error> {
        match self.mark(recorded.envelope.id.as_str()) {
            Mark::Ours => Ok(true),
            Mark::None => Ok(false),
            Mark::OtherRequest => Err(Error::IdempotencyKeyReused {
                key: self.legacy.as_ref().map_or("", |l| l.key).to_owned(),
                first_use: format!(
                    "another request on {stream} (event at position {})",
                    recorded.position
                ),
            }),
        }
    }

    /// Exact matches only: `<base>-<n>`, or `idem-<key>-<16 hex>-<n>`.
    fn mark(&self, id: &str) -> Mark {
        if id
            .strip_prefix(self.base.as_str())
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(is_digits)
        {
            return Mark::Ours;
        }
        if let Some(l) = &self.legacy
            && let Some((fp, _)) = legacy_parts(id, l.key)
        {
            return if fp == l.fingerprint {
                Mark::Ours
            } else {
                Mark::OtherRequest
            };
        }
        Mark::None
    }
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// `idem-<key>-<fp>-<n>` with exactly this key (parsed from the right, so
/// one key is never taken for another that it starts with).
fn legacy_parts<'a>(id: &'a str, key: &str) -> Option<(&'a str, &'a str)> {
    let rest = id.strip_prefix("idem-")?;
    let (head, n) = rest.rsplit_once('-')?;
    let (k, fp) = head.rsplit_once('-')?;
    (k == key && fp.len() == 16 && fp.bytes().all(|b| b.is_ascii_hexdigit()) && is_digits(n))
        .then_some((fp, n))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A stand-in for a domain's commands.
    enum Cmd {
        Deposit(i64),
        Withdraw(i64),
    }

    impl IdempotentCommand for Cmd {
        fn operation(&self) -> &'static str {
            match self {
                Cmd::Deposit(_) => "deposit",
                Cmd::Withdraw(_) => "withdraw",
            }
        }
        fn request(&self) -> Value {
            match self {
                Cmd::Deposit(a) | Cmd::Withdraw(a) => json!({"amount": a, "currency": null}),
            }
        }
    }

    fn scope_of(id: &str, command: &Cmd) -> Scope {
        let stream = StreamId::new("account", id).expect("valid id");
        Scope::of(&stream, command)
    }

    #[test]
    fn scopes_tell_resources_operations_and_requests_apart() {
        let deposit = Cmd::Deposit;
        assert_eq!(scope_of("a-1", &deposit(5)), scope_of("a-1", &deposit(5)));
        assert_ne!(scope_of("a-1", &deposit(5)), scope_of("a-1", &deposit(6)));
        assert_ne!(scope_of("a-1", &deposit(5)), scope_of("a-2", &deposit(5)));
        let withdraw = Cmd::Withdraw(5);
        assert_ne!(scope_of("a-1", &deposit(5)), scope_of("a-1", &withdraw));
        let r = Record::pending(&scope_of("a-1", &deposit(5)), new_attempt(), 0);
        assert!(r.matches(&scope_of("a-1", &deposit(5))));
        assert!(!r.matches(&scope_of("a-10", &deposit(5))));
        let text = r.describe();
        assert!(text.contains("deposit on account/a-1"), "{text}");
    }

    #[test]
    fn records_keep_their_stored_format() {
        let r = Record::pending(&scope_of("a-1", &Cmd::Deposit(5)), "idem-x".to_owned(), 7);
        let stored = serde_json::to_value(&r).expect("encodes");
        assert_eq!(stored["resource"], "account/a-1");
        assert_eq!(stored["operation"], "deposit");
        assert_eq!(stored["request"], json!({"amount": 5, "currency": null}));
        assert_eq!(stored["attempt"], "idem-x");
        assert_eq!(stored["lease_until_ms"], 7);
        let old = br#"{"resource":"account/a-1","operation":"deposit","request":{"amount":5,"currency":null},"attempt":"idem-x","created_ms":1}"#;
        let read = Record::from_bytes(old).expect("decodes");
        assert!(read.matches(&scope_of("a-1", &Cmd::Deposit(5))));
        assert_eq!(read.applied, None);
    }

    #[test]
    fn event_ids_of_a_request_match_exactly_never_by_prefix() {
        let (fp5, fp6) = ("00000000000000a5", "00000000000000a6");
        let a = Attempt {
            base: "idem-0190abcd".to_owned(),
            legacy: Some(Legacy {
                key: "inv",
                fingerprint: fp5.to_owned(),
            }),
        };
        assert_eq!(a.mark("idem-0190abcd-0"), Mark::Ours);
        assert_eq!(a.mark("idem-0190abcd-12"), Mark::Ours);
        assert_eq!(a.mark("idem-0190abcde-0"), Mark::None);
        assert_eq!(a.mark("idem-0190abcd-0x"), Mark::None);
        assert_eq!(a.mark("idem-0190abcd"), Mark::None);
        assert_eq!(a.mark(&format!("idem-inv-{fp5}-0")), Mark::Ours);
        assert_eq!(a.mark(&format!("idem-inv-{fp6}-0")), Mark::OtherRequest);
        // Key "inv" is not key "inv-x" (the old prefix match took one for the other).
        assert_eq!(a.mark(&format!("idem-inv-x-{fp5}-0")), Mark::None);
        assert_eq!(a.mark(&format!("idem-in-{fp5}-0")), Mark::None);
    }

    #[test]
    fn keys_are_checked() {
        assert!(validate_idempotency_key("order-7_2").is_ok());
        assert!(validate_idempotency_key("").is_err());
        assert!(validate_idempotency_key("a.b").is_err());
        assert!(validate_idempotency_key(&"k".repeat(65)).is_err());
    }
}
