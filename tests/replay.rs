//! Partial recovery of live projections against a real nats-server and real
//! SQLite files and PostgreSQL databases: `replay` from a position (exact,
//! while the projector runs) and redriving a projection's own dead letters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sluice_events::{EventStore, ExpectedVersion, NewEvent, StreamId};
use sluice_ledger::{
    ACCOUNT_ACTIVITY, ACCOUNT_BALANCES, AccountActivity, AccountBalances, AccountEvent,
};
use sluice_projections::{
    Database, Member, ProjectedEvent, Projection, Rejection, RewindSupport, RunnerConfig, Tables,
    read_checkpoint,
};
use sluice_testkit::NatsServer;
use sqlx::{AnyConnection, Row};
use tokio_util::sync::CancellationToken;

#[macro_use]
#[path = "support/read_store.rs"]
mod read_store;
use read_store::{Backend, Store, wait_checkpoint};

// ---------------------------------------------------------------- helpers

fn config() -> RunnerConfig {
    RunnerConfig {
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(300),
        idle_check: Duration::from_millis(200),
        ..RunnerConfig::default()
    }
}

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), sluice_projections::Error>>,
}

impl Running {
    async fn start(db: &Database, store: &EventStore, members: Vec<Member>) -> Self {
        let shutdown = CancellationToken::new();
        let r = sluice_projections::spawn_group(
            members,
            db.clone(),
            store.clone(),
            config(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        Running {
            shutdown,
            task: r.task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn ledger() -> Vec<Member> {
    vec![
        Member::from(Arc::new(AccountBalances::new())),
        Member::from(Arc::new(AccountActivity)),
    ]
}

/// How long a test waits for a projection to reach a position.
const WAIT: Duration = Duration::from_secs(60);

async fn append(store: &EventStore, category: &str, id: &str, event: NewEvent) -> u64 {
    let sid = StreamId::new(category, id).unwrap();
    store
        .append(&sid, ExpectedVersion::Any, vec![event])
        .await
        .unwrap()
        .version
}

/// Rounds of ledger events over `accounts` accounts, interleaved (so an
/// account's events are spread over the log). Returns the last position.
async fn ledger_rounds(store: &EventStore, accounts: usize, rounds: std::ops::Range<usize>) -> u64 {
    let mut last = 0;
    for round in rounds {
        for a in 0..accounts {
            let e = match (round, (a + round) % 4) {
                (0, _) => AccountEvent::Opened {
                    owner: format!("owner {a}"),
                    currency: "EUR".into(),
                },
                (_, 3) => AccountEvent::Withdrawn { amount: 1 },
                _ => AccountEvent::Deposited {
                    amount: ((a * 7 + round) % 50 + 1) as i64,
                },
            };
            last = append(store, "account", &format!("acc-{a}"), e.to_new_event()).await;
        }
    }
    last
}

fn raw_event(event_type: &str, data: &str) -> NewEvent {
    NewEvent::new(event_type, data.as_bytes().to_vec())
}

/// Everything the ledger read models and their bookkeeping hold, as text.
async fn dump(db: &Database) -> Vec<String> {
    let mut out = Vec::new();
    let queries = [
        "SELECT 'activity', position, account, event_type, COALESCE(amount, -1), time \
         FROM account_activity ORDER BY position",
        "SELECT 'balance', version, id, owner || '/' || currency || '/' || status, balance, updated_at \
         FROM account_balances ORDER BY id",
        "SELECT 'dead:' || projection, position, stream, kind, 0, reason \
         FROM sluice_dead_letters ORDER BY projection, position",
        "SELECT 'parked:' || projection, behind_position, stream, '', 0, '' \
         FROM sluice_parked ORDER BY projection, stream",
    ];
    for q in queries {
        for r in sqlx::query(q).fetch_all(db.pool()).await.unwrap() {
            out.push(format!(
                "{} {} {} {} {} {}",
                r.get::<String, _>(0),
                r.get::<i64, _>(1),
                r.get::<String, _>(2),
                r.get::<String, _>(3),
                r.get::<i64, _>(4),
                r.get::<String, _>(5),
            ));
        }
    }
    out
}

// ---------------------------------------------------------------- replay

/// Rows after position N are damaged (changed, deleted, made up); a replay
/// from N while the projector runs and events keep coming restores a read
/// model identical to a clean run, dead letters and parked accounts
/// included. (71 accounts: more than the replay reads one by one, so the
/// balances' earlier events come from a scan of the category.)
async fn replay_restores_what_came_after(backend: Backend) {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let rs = Store::fresh(backend, "sluice_replay").await;
    let db = rs.connect().await;

    ledger_rounds(&store, 70, 0..8).await;
    // A deposit to an account nobody opened: dead-lettered by balances.
    append(
        &store,
        "account",
        "ghost",
        raw_event("ledger.account.deposited.v1", r#"{"amount":5}"#),
    )
    .await;
    let n = ledger_rounds(&store, 70, 8..9).await - 10;
    ledger_rounds(&store, 70, 9..12).await;
    // After N: a meaningless event (both projections dead-letter it and
    // park acc-3), then more of acc-3 and of the ghost (parked).
    append(
        &store,
        "account",
        "acc-3",
        raw_event("ledger.account.deposited.v1", r#"{"amount":-5}"#),
    )
    .await;
    append(
        &store,
        "account",
        "ghost",
        raw_event("ledger.account.deposited.v1", r#"{"amount":6}"#),
    )
    .await;
    let last = ledger_rounds(&store, 70, 12..14).await;

    let running = Running::start(&db, &store, ledger()).await;
    wait_checkpoint(&db, ACCOUNT_BALANCES, last, WAIT).await;
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, last, WAIT).await;
    let before = dump(&db).await;

    // Damage everything from N on.
    for q in [
        format!("UPDATE account_activity SET amount = 999999 WHERE position >= {n}"),
        format!(
            "DELETE FROM account_activity WHERE position >= {} AND position < {}",
            n + 5,
            n + 9
        ),
        format!("UPDATE account_balances SET balance = balance + 1000 WHERE version >= {n}"),
        "INSERT INTO account_balances (id, owner, currency, balance, version, status, updated_at) \
         VALUES ('made-up', 'x', 'EUR', 1, 1, 'open', 'x')"
            .to_owned(),
    ] {
        sqlx::query(&q).execute(db.pool()).await.unwrap();
    }
    // The made-up row has no event at or after N: only a rebuild removes
    // it. Everything else must come back.
    assert_ne!(dump(&db).await, before, "the damage did not take");

    // Events keep coming while the replay runs.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move { ledger_rounds(&store, 70, 14..17).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let activity = sluice_projections::replay(
        Member::from(Arc::new(AccountActivity)),
        db.clone(),
        store.clone(),
        n,
    )
    .await
    .unwrap();
    assert_eq!(activity.from, n);
    assert!(activity.previous_checkpoint >= last);
    let balances = sluice_projections::replay(
        Member::from(Arc::new(AccountBalances::new())),
        db.clone(),
        store.clone(),
        n,
    )
    .await
    .unwrap();
    assert!(balances.aggregates_refolded >= 71, "{balances:?}");
    assert!(balances.dead_letters_cleared >= 3, "{balances:?}");
    let last = writer.await.unwrap();
    wait_checkpoint(&db, ACCOUNT_BALANCES, last, WAIT).await;
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, last, WAIT).await;
    running.stop().await;
    sqlx::query("DELETE FROM account_balances WHERE id = 'made-up'")
        .execute(db.pool())
        .await
        .unwrap();

    // A clean run over the same log.
    let clean_rs = Store::fresh(backend, "sluice_replay").await;
    let clean = clean_rs.connect().await;
    let running = Running::start(&clean, &store, ledger()).await;
    wait_checkpoint(&clean, ACCOUNT_BALANCES, last, WAIT).await;
    wait_checkpoint(&clean, ACCOUNT_ACTIVITY, last, WAIT).await;
    running.stop().await;
    let (got, want) = (dump(&db).await, dump(&clean).await);
    assert!(
        want.iter().any(|l| l.starts_with("dead:account_activity")),
        "{want:?}"
    );
    assert!(
        want.iter()
            .any(|l| l.starts_with("parked:account_balances")),
        "{want:?}"
    );
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w);
    }
    db.close().await;
    clean.close().await;
}

/// Replays at varying positions, one after another, racing a projector
/// that is busy applying a stream of appends: the end state still equals a
/// clean run (no event applied twice, none skipped).
async fn replays_racing_a_busy_projector(backend: Backend) {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let rs = Store::fresh(backend, "sluice_replay").await;
    let db = rs.connect().await;
    let first = ledger_rounds(&store, 40, 0..5).await;
    let running = Running::start(&db, &store, ledger()).await;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move { ledger_rounds(&store, 40, 5..25).await })
    };
    // Rounds until six replays took effect (a round whose position the
    // projector has not reached yet is refused and tried again), paced so
    // they interleave with the writer; bounded by WAIT.
    let mut replays = 0;
    let deadline = std::time::Instant::now() + WAIT;
    let mut i = 0u64;
    while replays < 6 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let from = 1 + (first * (i % 6 + 1)) / 7;
        i += 1;
        for member in ledger() {
            // A position the projector has not reached yet is refused;
            // the next round tries again.
            match sluice_projections::replay(member, db.clone(), store.clone(), from).await {
                Ok(_) => replays += 1,
                Err(sluice_projections::Error::ReplayOutOfRange { .. }) => {}
                Err(e) => panic!("replay from {from}: {e}"),
            }
        }
    }
    assert!(replays >= 6, "only {replays} replays took effect");
    let last = writer.await.unwrap();
    wait_checkpoint(&db, ACCOUNT_BALANCES, last, WAIT).await;
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, last, WAIT).await;
    running.stop().await;

    let clean_rs = Store::fresh(backend, "sluice_replay").await;
    let clean = clean_rs.connect().await;
    let running = Running::start(&clean, &store, ledger()).await;
    wait_checkpoint(&clean, ACCOUNT_BALANCES, last, WAIT).await;
    wait_checkpoint(&clean, ACCOUNT_ACTIVITY, last, WAIT).await;
    running.stop().await;
    let (got, want) = (dump(&db).await, dump(&clean).await);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w);
    }
    db.close().await;
    clean.close().await;
}

// ---------------------------------------------------------------- group rebuild

/// The members of a running group rebuilt together (one feed, one switch)
/// while events keep coming: both damaged read models come back equal to a
/// clean run, dead letters included, and no copy or rebuild checkpoint is
/// left behind.
async fn group_rebuild_switches_members_together(backend: Backend) {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let rs = Store::fresh(backend, "sluice_replay").await;
    let db = rs.connect().await;
    ledger_rounds(&store, 30, 0..6).await;
    append(
        &store,
        "account",
        "ghost",
        raw_event("ledger.account.deposited.v1", r#"{"amount":5}"#),
    )
    .await;
    let last = ledger_rounds(&store, 30, 6..10).await;
    let running = Running::start(&db, &store, ledger()).await;
    wait_checkpoint(&db, ACCOUNT_BALANCES, last, WAIT).await;
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, last, WAIT).await;
    for q in [
        "UPDATE account_balances SET balance = -1",
        "DELETE FROM account_activity WHERE position % 7 = 0",
    ] {
        sqlx::query(q).execute(db.pool()).await.unwrap();
    }
    let writer = {
        let store = store.clone();
        tokio::spawn(async move { ledger_rounds(&store, 30, 10..13).await })
    };
    let report = sluice_projections::rebuild_group(
        ledger(),
        db.clone(),
        store.clone(),
        config(),
        |_| {},
        CancellationToken::new(),
    )
    .await
    .unwrap()
    .expect("finished");
    assert!(report.position >= last, "{report:?}");
    let last = writer.await.unwrap();
    wait_checkpoint(&db, ACCOUNT_BALANCES, last, WAIT).await;
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, last, WAIT).await;
    running.stop().await;
    let leftovers: i64 =
        sqlx::query("SELECT COUNT(*) FROM sluice_checkpoints WHERE projection LIKE '%rebuild'")
            .fetch_one(db.pool())
            .await
            .unwrap()
            .get(0);
    assert_eq!(leftovers, 0);

    let clean_rs = Store::fresh(backend, "sluice_replay").await;
    let clean = clean_rs.connect().await;
    let running = Running::start(&clean, &store, ledger()).await;
    wait_checkpoint(&clean, ACCOUNT_BALANCES, last, WAIT).await;
    wait_checkpoint(&clean, ACCOUNT_ACTIVITY, last, WAIT).await;
    running.stop().await;
    let (got, want) = (dump(&db).await, dump(&clean).await);
    assert!(
        want.iter().any(|l| l.starts_with("dead:account_balances")),
        "{want:?}"
    );
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w);
    }
    db.close().await;
    clean.close().await;
}

// ---------------------------------------------------------------- a test projection

/// `notes`: one row per `note` event. Rejects bodies containing "evil"
/// always, and "bad" until `fixed` (a handler bug fixed later).
struct Notes {
    fixed: Arc<AtomicBool>,
    rewindable: bool,
}

impl Projection for Notes {
    fn name(&self) -> &'static str {
        "notes"
    }

    fn categories(&self) -> &'static [&'static str] {
        &["note"]
    }

    fn tables(&self) -> &'static [&'static str] {
        &["notes"]
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        tables: &Tables,
        events: &[ProjectedEvent],
    ) -> Result<Vec<Rejection>, sqlx::Error> {
        let mut rejected = Vec::new();
        for e in events {
            let body = String::from_utf8_lossy(&e.envelope.data).into_owned();
            if body.contains("evil") || (body.contains("bad") && !self.fixed.load(Ordering::SeqCst))
            {
                rejected.push(Rejection::new(e.position, format!("cannot take {body}")));
                continue;
            }
            sqlx::query(&format!(
                "INSERT INTO {} (position, stream, body) VALUES ($1, $2, $3)",
                tables.name("notes")
            ))
            .bind(e.position as i64)
            .bind(e.stream_id.to_string())
            .bind(body)
            .execute(&mut *conn)
            .await?;
        }
        Ok(rejected)
    }

    fn rewind_support(&self) -> RewindSupport {
        if self.rewindable {
            RewindSupport::ByPosition
        } else {
            RewindSupport::Unsupported
        }
    }

    async fn rewind(
        &self,
        conn: &mut AnyConnection,
        tables: &Tables,
        from: u64,
        _aggregates: &[StreamId],
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "DELETE FROM {} WHERE position >= $1",
            tables.name("notes")
        ))
        .bind(from as i64)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

async fn notes_table(db: &Database) {
    sqlx::query("CREATE TABLE notes (position BIGINT PRIMARY KEY, stream TEXT NOT NULL, body TEXT NOT NULL)")
        .execute(db.pool())
        .await
        .unwrap();
}

async fn note(store: &EventStore, id: &str, body: &str) -> u64 {
    append(
        store,
        "note",
        id,
        raw_event("note.v1", &format!("{{\"body\":\"{body}\"}}")),
    )
    .await
}

async fn note_positions(db: &Database) -> Vec<u64> {
    sqlx::query("SELECT position FROM notes ORDER BY position")
        .fetch_all(db.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<i64, _>(0) as u64)
        .collect()
}

/// A projection that cannot undo exactly is refused with a pointer to
/// `rebuild`, and nothing changes; positions it has not reached are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_refuses_what_cannot_be_undone_exactly() {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let rs = Store::fresh(Backend::Sqlite, "sluice_replay").await;
    let db = rs.connect().await;
    notes_table(&db).await;
    let fixed = Arc::new(AtomicBool::new(true));
    let member = |rewindable| {
        Member::from(Arc::new(Notes {
            fixed: fixed.clone(),
            rewindable,
        }))
    };
    note(&store, "a", "one").await;
    let last = note(&store, "a", "two").await;
    let running = Running::start(&db, &store, vec![member(false)]).await;
    wait_checkpoint(&db, "notes", last, WAIT).await;

    let err = sluice_projections::replay(member(false), db.clone(), store.clone(), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(err, sluice_projections::Error::RewindUnsupported { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("projection notes cannot be replayed")
            && err.to_string().contains("rebuild it instead"),
        "{err}"
    );
    assert_eq!(read_checkpoint(&db, "notes").await.unwrap(), last);
    assert_eq!(note_positions(&db).await, vec![last - 1, last]);

    for from in [0, last + 2] {
        let err = sluice_projections::replay(member(true), db.clone(), store.clone(), from)
            .await
            .unwrap_err();
        assert!(
            matches!(err, sluice_projections::Error::ReplayOutOfRange { .. }),
            "{err}"
        );
    }
    // Right after the checkpoint: nothing to undo, nothing changes.
    sluice_projections::replay(member(true), db.clone(), store.clone(), last + 1)
        .await
        .unwrap();
    assert_eq!(read_checkpoint(&db, "notes").await.unwrap(), last);
    running.stop().await;
    db.close().await;
}

// ---------------------------------------------------------------- redrive

/// Dead letters of a projection are applied once the handler is fixed, in
/// order, exactly once, while its runner runs; the aggregate is released;
/// an event still rejected keeps its aggregate parked with the new reason.
async fn redrive_applies_dead_letters_once(backend: Backend) {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let rs = Store::fresh(backend, "sluice_replay").await;
    let db = rs.connect().await;
    notes_table(&db).await;
    let fixed = Arc::new(AtomicBool::new(false));
    let member = || {
        Member::from(Arc::new(Notes {
            fixed: fixed.clone(),
            rewindable: true,
        }))
    };
    let a1 = note(&store, "a", "ok").await;
    let a2 = note(&store, "a", "bad").await;
    let a3 = note(&store, "a", "ok").await;
    let b1 = note(&store, "b", "bad").await;
    let b2 = note(&store, "b", "evil").await;
    let b3 = note(&store, "b", "ok").await;
    let c1 = note(&store, "c", "ok").await;
    let running = Running::start(&db, &store, vec![member()]).await;
    wait_checkpoint(&db, "notes", c1, WAIT).await;
    assert_eq!(note_positions(&db).await, vec![a1, c1]);
    let dead = sluice_projections::dead_letters(&db, "notes")
        .await
        .unwrap();
    let dead_positions: Vec<u64> = dead.iter().map(|d| d.position).collect();
    assert_eq!(dead_positions, vec![a2, a3, b1, b2, b3]);

    // Not fixed yet: a redrive applies nothing and keeps everything.
    let report = sluice_projections::redrive(member(), db.clone(), store.clone())
        .await
        .unwrap();
    assert!(report.applied.is_empty(), "{report:?}");
    assert_eq!(report.remaining.len(), 5);

    fixed.store(true, Ordering::SeqCst);
    let report = sluice_projections::redrive(member(), db.clone(), store.clone())
        .await
        .unwrap();
    assert_eq!(report.applied, vec![a2, a3, b1]);
    assert_eq!(report.released, vec!["note/a".to_owned()]);
    let remaining: Vec<(u64, String)> = report
        .remaining
        .iter()
        .map(|d| (d.position, d.kind.clone()))
        .collect();
    assert_eq!(
        remaining,
        vec![(b2, "handler".into()), (b3, "parked".into())]
    );
    assert!(report.remaining[0].reason.contains("evil"), "{report:?}");
    assert_eq!(note_positions(&db).await, vec![a1, a2, a3, b1, c1]);

    // Released: a's next event applies; b's is parked behind b2.
    let a4 = note(&store, "a", "ok").await;
    let b4 = note(&store, "b", "ok").await;
    wait_checkpoint(&db, "notes", b4, WAIT).await;
    assert_eq!(note_positions(&db).await, vec![a1, a2, a3, b1, c1, a4]);

    // Exactly once: a second redrive has nothing more to apply.
    let again = sluice_projections::redrive(member(), db.clone(), store.clone())
        .await
        .unwrap();
    assert!(again.applied.is_empty(), "{again:?}");
    assert_eq!(note_positions(&db).await, vec![a1, a2, a3, b1, c1, a4]);
    let parked: Vec<(String, i64)> =
        sqlx::query("SELECT stream, behind_position FROM sluice_parked WHERE projection = 'notes'")
            .fetch_all(db.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    assert_eq!(parked, vec![("note/b".to_owned(), b2 as i64)]);

    // The DLQ stream keeps copies only of what is still dead.
    let listing = sluice_workers::dlq::list(
        &store,
        &sluice_workers::dlq::Filter {
            consumer: Some("projection-notes".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut in_dlq: Vec<u64> = listing.entries.iter().map(|e| e.sequence).collect();
    in_dlq.sort_unstable();
    assert_eq!(in_dlq, vec![b2, b3, b4]);
    running.stop().await;
    db.close().await;
}

both_backends!(
    replay_restores_what_came_after,
    redrive_applies_dead_letters_once,
    group_rebuild_switches_members_together,
    replays_racing_a_busy_projector,
);
