//! Projections against a real nats-server and real SQLite files and
//! PostgreSQL databases: one conformance suite run on both backends.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sluice_events::{EventStore, ExpectedVersion, NewEvent, StreamId};
use sluice_ledger::{
    ACCOUNT_ACTIVITY, ACCOUNT_BALANCES, AccountActivity, AccountBalances, AccountEvent, ReadSide,
    WriteMode,
};
use sluice_projections::{
    Database, FailurePolicy, LiveStatus, Member, Projection, RunState, RunnerConfig,
    read_checkpoint,
};
use sluice_testkit::NatsServer;
use sqlx::Row;
use tokio_util::sync::CancellationToken;

#[macro_use]
#[path = "support/read_store.rs"]
mod read_store;
use read_store::{Backend, Store, wait_checkpoint};

// ---------------------------------------------------------------- workload

/// A deterministic pseudo-random generator (no dependency, reproducible).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

/// Per account, the events to append and the balance they fold to.
fn workload(
    accounts: usize,
    events_per_account: usize,
    seed: u64,
) -> Vec<(String, Vec<AccountEvent>, i64)> {
    let mut rng = Lcg(seed);
    (0..accounts)
        .map(|a| {
            let id = format!("acc-{a}");
            let mut evs = vec![AccountEvent::Opened {
                owner: format!("owner {a}"),
                currency: "EUR".into(),
            }];
            let mut balance = 0i64;
            for _ in 1..events_per_account {
                let amount = (rng.next() % 10_000 + 1) as i64;
                if rng.next().is_multiple_of(3) && amount <= balance {
                    balance -= amount;
                    evs.push(AccountEvent::Withdrawn { amount });
                } else {
                    balance += amount;
                    evs.push(AccountEvent::Deposited { amount });
                }
            }
            (id, evs, balance)
        })
        .collect()
}

/// Appends the workload (accounts concurrently, each in order, in chunks).
async fn append_workload(store: &EventStore, work: &[(String, Vec<AccountEvent>, i64)]) -> u64 {
    let results: Vec<u64> = futures::stream::iter(work.to_vec())
        .map(|(id, evs, _)| {
            let store = store.clone();
            async move {
                let sid = StreamId::new("account", id.as_str()).unwrap();
                let mut last = 0;
                for chunk in evs.chunks(20) {
                    let new: Vec<NewEvent> = chunk.iter().map(AccountEvent::to_new_event).collect();
                    last = store
                        .append(&sid, ExpectedVersion::Any, new)
                        .await
                        .unwrap()
                        .version;
                }
                last
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    results.into_iter().max().unwrap_or(0)
}

async fn append_one(store: &EventStore, account: &str, e: &AccountEvent) -> u64 {
    let sid = StreamId::new("account", account).unwrap();
    store
        .append(&sid, ExpectedVersion::Any, vec![e.to_new_event()])
        .await
        .unwrap()
        .version
}

async fn append_raw(store: &EventStore, account: &str, event_type: &str, data: &str) -> u64 {
    let sid = StreamId::new("account", account).unwrap();
    store
        .append(
            &sid,
            ExpectedVersion::Any,
            vec![NewEvent::new(event_type, data.as_bytes().to_vec())],
        )
        .await
        .unwrap()
        .version
}

// ---------------------------------------------------------------- helpers

fn config() -> RunnerConfig {
    RunnerConfig {
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(300),
        ..RunnerConfig::default()
    }
}

struct Running {
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Result<(), sluice_projections::Error>>>,
    live: HashMap<&'static str, LiveStatus>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// A crash: the tasks die wherever they are (mid-transaction too).
    fn abort(self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn start_with<P: Projection>(
    db: &Database,
    store: &EventStore,
    projections: Vec<Arc<P>>,
    cfg: RunnerConfig,
) -> Running {
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut live = HashMap::new();
    for p in projections {
        let r =
            sluice_projections::spawn(p, db.clone(), store.clone(), cfg.clone(), shutdown.clone())
                .await
                .unwrap();
        for p in r.projections {
            live.insert(p.name, p.live);
        }
        tasks.push(r.task);
    }
    Running {
        shutdown,
        tasks,
        live,
    }
}

/// Both ledger projections.
/// Both ledger projections as one group (how `sluice up` runs them).
async fn start_ledger(db: &Database, store: &EventStore, cfg: RunnerConfig) -> Running {
    let shutdown = CancellationToken::new();
    let r = sluice_projections::spawn_group(
        vec![
            Member::from(Arc::new(AccountBalances::new())),
            Member::from(Arc::new(AccountActivity)),
        ],
        db.clone(),
        store.clone(),
        cfg,
        shutdown.clone(),
    )
    .await
    .unwrap();
    Running {
        shutdown,
        tasks: vec![r.task],
        live: r
            .projections
            .into_iter()
            .map(|p| (p.name, p.live))
            .collect(),
    }
}

/// Both ledger projections, each on its own runner and feed.
async fn start_ledger_separately(db: &Database, store: &EventStore, cfg: RunnerConfig) -> Running {
    let mut a = start_with(
        db,
        store,
        vec![Arc::new(AccountBalances::new())],
        cfg.clone(),
    )
    .await;
    let b = start_with(db, store, vec![Arc::new(AccountActivity)], cfg).await;
    a.tasks.extend(b.tasks);
    a.live.extend(b.live);
    // One token for both: cancel b's through a's.
    let (sa, sb) = (a.shutdown.clone(), b.shutdown);
    tokio::spawn(async move {
        sa.cancelled().await;
        sb.cancel();
    });
    a
}

/// The runner clears its error right after the commit that a checkpoint
/// poll may see first.
async fn wait_error_cleared(live: &LiveStatus) {
    let start = Instant::now();
    while let Some(e) = live.snapshot().last_error {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still failing: {e}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn balances(db: &Database) -> BTreeMap<String, (i64, u64, String)> {
    sqlx::query("SELECT id, balance, version, status FROM account_balances")
        .fetch_all(db.pool())
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.get::<String, _>(0),
                (
                    r.get::<i64, _>(1),
                    r.get::<i64, _>(2) as u64,
                    r.get::<String, _>(3),
                ),
            )
        })
        .collect()
}

async fn activity_positions(db: &Database) -> Vec<u64> {
    sqlx::query("SELECT position FROM account_activity ORDER BY position")
        .fetch_all(db.pool())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get::<i64, _>(0) as u64)
        .collect()
}

/// Positions of every account event in the log.
async fn log_positions(store: &EventStore) -> Vec<u64> {
    let mut all = store.read_all(1).await.unwrap();
    let mut out = Vec::new();
    while let Some(e) = all.next().await {
        let e = e.unwrap();
        if e.stream_id.category() == "account" {
            out.push(e.position);
        }
    }
    out
}

fn assert_balances(
    got: &BTreeMap<String, (i64, u64, String)>,
    work: &[(String, Vec<AccountEvent>, i64)],
) {
    assert_eq!(got.len(), work.len(), "one row per account");
    for (id, _, balance) in work {
        assert_eq!(got[id].0, *balance, "balance of {id}");
    }
}

// ---------------------------------------------------------------- suite

/// Ledger balances equal the fold of each account's events; activity holds
/// exactly the log's account events.
async fn balances_equal_the_fold(backend: Backend) {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let rs = Store::fresh(backend, "sluice_proj").await;
    let db = rs.connect().await;
    let work = workload(1000, 50, 7);
    let last = append_workload(&store, &work).await;
    let t0 = Instant::now();
    let running = start_ledger(&db, &store, config()).await;
    wait_checkpoint(&db, ACCOUNT_BALANCES, last, Duration::from_secs(60)).await;
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, last, Duration::from_secs(60)).await;
    let took = t0.elapsed();
    eprintln!(
        "{backend:?}: {} events through both projections in {took:?} ({:.0} events/s)",
        last,
        last as f64 / took.as_secs_f64()
    );
    assert_balances(&balances(&db).await, &work);
    assert_eq!(activity_positions(&db).await, log_positions(&store).await);
    // Versions are the position of each account's last event.
    let mut last_of: HashMap<String, u64> = HashMap::new();
    let mut all = store.read_all(1).await.unwrap();
    while let Some(e) = all.next().await {
        let e = e.unwrap();
        last_of.insert(e.stream_id.id().to_owned(), e.position);
    }
    for (id, (_, version, _)) in balances(&db).await {
        assert_eq!(version, last_of[&id], "version of {id}");
    }
    running.stop().await;
    db.close().await;
}

/// The projector is crashed (task abort, mid-batch included) many times
/// while events flow: no duplicates, no gaps, the same balances.
async fn exactly_once_across_crashes(backend: Backend) {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let rs = Store::fresh(backend, "sluice_proj").await;
    let db = rs.connect().await;
    let work = workload(1000, 50, 11);
    let writer = {
        let store = store.clone();
        let work = work.clone();
        tokio::spawn(async move { append_workload(&store, &work).await })
    };
    let small = RunnerConfig {
        max_batch: 64,
        ..config()
    };
    let mut rng = Lcg(3);
    for _ in 0..10 {
        // Separate runners here (the group path is crashed in the
        // process-kill test), so both shapes are covered. Each crash gets its
        // own pool and loses it, as a crashed process loses its connections:
        // an aborted task's half-done transaction must not linger in a pool
        // the next runner shares (the server rolls it back when its
        // connection closes).
        let crashed_db = rs.connect().await;
        let running = start_ledger_separately(&crashed_db, &store, small.clone()).await;
        tokio::time::sleep(Duration::from_millis(20 + rng.next() % 120)).await;
        running.abort();
        crashed_db.close().await;
    }
    let last = writer.await.unwrap();
    let running = start_ledger(&db, &store, config()).await;
    wait_checkpoint(&db, ACCOUNT_BALANCES, last, Duration::from_secs(60)).await;
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, last, Duration::from_secs(60)).await;
    running.stop().await;
    // Zero duplicates (primary key) and zero gaps: exactly the log.
    assert_eq!(activity_positions(&db).await, log_positions(&store).await);
    assert_balances(&balances(&db).await, &work);
    db.close().await;
}

/// A restarted runner resumes from its SQL checkpoint, also after the NATS
/// server restarted (so no broker state could help it).
async fn resumes_from_the_checkpoint(backend: Backend) {
    let mut nats = NatsServer::start();
    let store = nats.store().await;
    let rs = Store::fresh(backend, "sluice_proj").await;
    let db = rs.connect().await;
    let first = workload(10, 5, 1);
    let last = append_workload(&store, &first).await;
    let running = start_ledger(&db, &store, config()).await;
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, last, Duration::from_secs(30)).await;
    wait_checkpoint(&db, ACCOUNT_BALANCES, last, Duration::from_secs(30)).await;
    running.stop().await;
    assert_eq!(read_checkpoint(&db, ACCOUNT_ACTIVITY).await.unwrap(), last);

    nats.restart();
    let store = nats.store().await;
    let more = append_one(&store, "acc-1", &AccountEvent::Deposited { amount: 5 }).await;
    let running = start_ledger(&db, &store, config()).await;
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, more, Duration::from_secs(30)).await;
    wait_checkpoint(&db, ACCOUNT_BALANCES, more, Duration::from_secs(30)).await;
    // Only the new event was applied by this run.
    assert_eq!(running.live[ACCOUNT_ACTIVITY].snapshot().applied, 1);
    assert_eq!(running.live[ACCOUNT_BALANCES].snapshot().applied, 1);
    running.stop().await;
    assert_eq!(balances(&db).await["acc-1"].0, first[1].2 + 5);
    assert_eq!(activity_positions(&db).await, log_positions(&store).await);
    db.close().await;
}

/// The read-model table disappears (renamed away) while events flow: the
/// projection blocks on the same batch, reports the error, never skips, and
/// catches up once the table is back.
async fn transient_failure_blocks_without_skipping(backend: Backend) {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let rs = Store::fresh(backend, "sluice_proj").await;
    let db = rs.connect().await;
    let work = workload(20, 5, 5);
    let before = append_workload(&store, &work[..10]).await;
    let running = start_ledger(&db, &store, config()).await;
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, before, Duration::from_secs(30)).await;

    sqlx::query("ALTER TABLE account_activity RENAME TO account_activity_away")
        .execute(db.pool())
        .await
        .unwrap();
    let last = append_workload(&store, &work[10..]).await;
    // Both projections share one transaction per batch (a group): both
    // block on the missing table; neither skips.
    let start = Instant::now();
    while running.live[ACCOUNT_ACTIVITY]
        .snapshot()
        .last_error
        .is_none()
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no error reported"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        read_checkpoint(&db, ACCOUNT_ACTIVITY).await.unwrap(),
        before
    );
    assert_eq!(
        read_checkpoint(&db, ACCOUNT_BALANCES).await.unwrap(),
        before
    );

    if let Backend::Postgres = backend {
        // Connections killed under the pool are transient too.
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .execute(db.pool())
        .await
        .unwrap();
    }
    sqlx::query("ALTER TABLE account_activity_away RENAME TO account_activity")
        .execute(db.pool())
        .await
        .unwrap();
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, last, Duration::from_secs(30)).await;
    assert!(
        running.live[ACCOUNT_ACTIVITY]
            .snapshot()
            .last_error
            .is_none()
    );
    running.stop().await;
    assert_eq!(activity_positions(&db).await, log_positions(&store).await);
    assert_balances(&balances(&db).await, &work);
    db.close().await;
}

/// Nonsense events are dead-lettered with a reason, their account parked
/// (also across a restart), and every other account keeps flowing.
async fn dead_letters_park_the_account_only(backend: Backend) {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let rs = Store::fresh(backend, "sluice_proj").await;
    let db = rs.connect().await;
    let open = |o: &str| AccountEvent::Opened {
        owner: o.into(),
        currency: "EUR".into(),
    };
    append_one(&store, "good", &open("g")).await;
    append_one(&store, "bad", &open("b")).await;
    let ghost = append_one(&store, "ghost", &AccountEvent::Deposited { amount: 5 }).await;
    let negative = append_raw(&store, "bad", sluice_ledger::DEPOSITED, r#"{"amount":-5}"#).await;
    let parked = append_one(&store, "bad", &AccountEvent::Deposited { amount: 7 }).await;
    // An envelope that breaks the contract (no CloudEvents headers).
    let js = store.jetstream();
    let ack = js
        .publish("events.account.broken", "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let broken = ack.sequence;
    // Two events in one atomic append: stored with `Nats-Batch-*` headers,
    // which must not leak into the dead-letter publish.
    store
        .append(
            &StreamId::new("account", "ghost2").unwrap(),
            ExpectedVersion::Any,
            vec![
                AccountEvent::Deposited { amount: 1 }.to_new_event(),
                AccountEvent::Deposited { amount: 2 }.to_new_event(),
            ],
        )
        .await
        .unwrap();
    let last = append_one(&store, "good", &AccountEvent::Deposited { amount: 9 }).await;

    let running = start_ledger(&db, &store, config()).await;
    wait_checkpoint(&db, ACCOUNT_BALANCES, last, Duration::from_secs(30)).await;
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, last, Duration::from_secs(30)).await;
    running.stop().await;
    let b = balances(&db).await;
    assert_eq!(b["good"].0, 9);
    assert_eq!(b["bad"].0, 0, "nothing after the rejected deposit applied");
    assert!(!b.contains_key("ghost"));

    let dead: BTreeMap<u64, (String, String)> =
        sqlx::query("SELECT position, kind, reason FROM sluice_dead_letters WHERE projection = $1")
            .bind(ACCOUNT_BALANCES)
            .fetch_all(db.pool())
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.get::<i64, _>(0) as u64, (r.get(1), r.get(2))))
            .collect();
    assert!(dead[&ghost].1.contains("unknown account"), "{dead:?}");
    assert!(dead[&negative].1.contains("> 0"), "{dead:?}");
    assert_eq!(dead[&parked].0, "parked");
    assert_eq!(dead[&broken].0, "decode");

    // The DLQ stream holds them in the contract's format.
    let dlq = js.get_stream("DLQ").await.unwrap();
    let m = dlq
        .direct_get_last_for_subject("dlq.projection-account_balances.account")
        .await
        .unwrap();
    let h = &m.headers;
    assert_eq!(h.get("Sluice-Dlq-Stream").unwrap().as_str(), "EVENTS");
    assert_eq!(
        h.get("Sluice-Dlq-Consumer").unwrap().as_str(),
        "projection-account_balances"
    );
    assert!(h.get("Sluice-Dlq-Reason").is_some());
    assert!(h.get("Sluice-Dlq-Failed-At").is_some());
    assert!(h.get("Sluice-Dlq-Deliveries").is_some());
    let seq: u64 = h
        .get("Sluice-Dlq-Sequence")
        .unwrap()
        .as_str()
        .parse()
        .unwrap();
    assert!(dead.contains_key(&seq));
    // One DLQ message per dead-letter row: ghost, negative, parked,
    // broken, and both events of the atomic ghost2 append.
    assert_eq!(dead.len(), 6, "{dead:?}");
    let mut subjects = dlq
        .info_with_subjects("dlq.projection-account_balances.account")
        .await
        .unwrap();
    let mut in_dlq = 0;
    while let Some(item) = subjects.next().await {
        in_dlq += item.unwrap().1;
    }
    assert_eq!(in_dlq, 6);

    // Parking survives a restart: a later event of `bad` is held too.
    let later = append_one(&store, "bad", &AccountEvent::Deposited { amount: 1 }).await;
    let running = start_ledger(&db, &store, config()).await;
    wait_checkpoint(&db, ACCOUNT_BALANCES, later, Duration::from_secs(30)).await;
    running.stop().await;
    assert_eq!(balances(&db).await["bad"].0, 0);
    let status = sluice_projections::projection_status(&db, &store, ACCOUNT_BALANCES, None)
        .await
        .unwrap();
    assert_eq!(
        status.parked_aggregates, 4,
        "bad, ghost, ghost2, broken: {status:?}"
    );
    assert_eq!(status.lag_events, 0);
    db.close().await;
}

/// The `halt` policy stops before the first bad event and says so.
async fn halt_policy_stops_before_the_bad_event(backend: Backend) {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let rs = Store::fresh(backend, "sluice_proj").await;
    let db = rs.connect().await;
    let ok = append_one(
        &store,
        "a",
        &AccountEvent::Opened {
            owner: "a".into(),
            currency: "EUR".into(),
        },
    )
    .await;
    let bad = append_one(&store, "ghost", &AccountEvent::Deposited { amount: 5 }).await;
    append_one(&store, "a", &AccountEvent::Deposited { amount: 5 }).await;
    let cfg = RunnerConfig {
        failure_policy: FailurePolicy::Halt,
        ..config()
    };
    let running = start_with(&db, &store, vec![Arc::new(AccountBalances::new())], cfg).await;
    let live = running.live[ACCOUNT_BALANCES].clone();
    let start = Instant::now();
    while live.snapshot().state != RunState::Halted {
        assert!(start.elapsed() < Duration::from_secs(20), "never halted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.stop().await;
    assert_eq!(read_checkpoint(&db, ACCOUNT_BALANCES).await.unwrap(), ok);
    let status = sluice_projections::projection_status(&db, &store, ACCOUNT_BALANCES, None)
        .await
        .unwrap();
    assert_eq!(status.state, RunState::Halted);
    let halt = status.halted.unwrap();
    assert_eq!(halt.position, bad);
    assert!(halt.reason.contains("unknown account"));
    assert_eq!(status.lag_events, 2);
    db.close().await;
}

/// Blue/green rebuild while the live tables serve queries and events keep
/// flowing: no query fails, readers see the old version (damaged on
/// purpose) until the switch and the rebuilt one after, never a partial one.
async fn rebuild_switches_blue_green_under_load(backend: Backend) {
    use sluice_projections::ReadModel;
    let nats = NatsServer::start();
    let store = nats.store().await;
    let rs = Store::fresh(backend, "sluice_proj").await;
    let db = rs.connect().await;
    let work = workload(300, 30, 17);
    let last = append_workload(&store, &work).await;
    let running = start_ledger(&db, &store, config()).await;
    wait_checkpoint(&db, ACCOUNT_BALANCES, last, Duration::from_secs(60)).await;
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, last, Duration::from_secs(60)).await;
    // Damage the live read model: only a rebuild repairs it.
    sqlx::query("UPDATE account_balances SET balance = -1 WHERE id = 'acc-0'")
        .execute(db.pool())
        .await
        .unwrap();

    let stop = CancellationToken::new();
    let readers = {
        let (db, stop) = (db.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.is_cancelled() {
                let mut conn = db.pool().acquire().await.unwrap();
                let row = AccountBalances::new()
                    .get(&mut conn, "acc-0")
                    .await
                    .expect("query during rebuild")
                    .expect("acc-0 row");
                let n: i64 = sqlx::query("SELECT COUNT(*) FROM account_balances")
                    .fetch_one(&mut *conn)
                    .await
                    .expect("count during rebuild")
                    .get(0);
                assert_eq!(n, 300, "a partial version was visible");
                let balance = row["balance"].as_i64().unwrap();
                if seen.last() != Some(&balance) {
                    seen.push(balance);
                }
                drop(conn);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            seen
        })
    };
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut last = 0;
            for _ in 0..50 {
                last = append_one(&store, "acc-1", &AccountEvent::Deposited { amount: 1 }).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            last
        })
    };
    let mut reports = 0;
    let report = sluice_projections::rebuild(
        Arc::new(AccountBalances::new()),
        db.clone(),
        store.clone(),
        config(),
        |_| reports += 1,
        CancellationToken::new(),
    )
    .await
    .unwrap()
    .expect("finished");
    sluice_projections::rebuild(
        Arc::new(AccountActivity),
        db.clone(),
        store.clone(),
        config(),
        |_| {},
        CancellationToken::new(),
    )
    .await
    .unwrap()
    .expect("finished");
    assert!(report.position >= last);
    let extra = writer.await.unwrap();
    wait_checkpoint(&db, ACCOUNT_BALANCES, extra, Duration::from_secs(30)).await;
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, extra, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.cancel();
    let seen = readers.await.unwrap();
    running.stop().await;

    // Old (damaged) version first, then only the rebuilt one.
    assert_eq!(seen.first(), Some(&-1), "{seen:?}");
    assert!(
        !seen[1..].contains(&-1),
        "went back to the old version: {seen:?}"
    );
    let mut b = balances(&db).await;
    b.get_mut("acc-1").unwrap().0 -= 50;
    assert_balances(&b, &work);
    assert_eq!(activity_positions(&db).await, log_positions(&store).await);
    let status = sluice_projections::projection_status(&db, &store, ACCOUNT_BALANCES, None)
        .await
        .unwrap();
    assert_eq!(status.rebuild_position, None);
    assert_eq!(status.lag_events, 0);
    eprintln!(
        "{backend:?}: rebuild of {} events at {:.0} events/s ({reports} progress reports)",
        report.position, report.events_per_second
    );
    db.close().await;
}

/// Losing the read store (SQLite file deleted, PostgreSQL schema dropped)
/// and starting again rebuilds every projection from the log; `reset`
/// does the same online.
async fn recovers_from_losing_the_read_store(backend: Backend) {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let rs = Store::fresh(backend, "sluice_proj").await;
    let db = rs.connect().await;
    let work = workload(50, 10, 23);
    let last = append_workload(&store, &work).await;
    let running = start_ledger(&db, &store, config()).await;
    wait_checkpoint(&db, ACCOUNT_BALANCES, last, Duration::from_secs(30)).await;
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, last, Duration::from_secs(30)).await;

    // Online reset: the running projector replays from position 1.
    sluice_projections::reset(&db, &AccountBalances::new())
        .await
        .unwrap();
    if matches!(backend, Backend::Postgres) {
        // The reset vacuumed the emptied table rather than leaving its old
        // rows as dead tuples in the replay's way.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let vacuumed: bool = sqlx::query_scalar(
                "SELECT last_vacuum IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'account_balances'",
            )
            .fetch_one(db.pool())
            .await
            .unwrap();
            if vacuumed {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "account_balances was not vacuumed after the reset"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    wait_checkpoint(&db, ACCOUNT_BALANCES, last, Duration::from_secs(30)).await;
    assert_balances(&balances(&db).await, &work);
    running.stop().await;

    // Data loss.
    match backend {
        Backend::Sqlite => {
            db.close().await;
            let path = rs.url.trim_start_matches("sqlite://").to_owned();
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{path}{suffix}"));
            }
        }
        Backend::Postgres => {
            sqlx::query("DROP SCHEMA public CASCADE")
                .execute(db.pool())
                .await
                .unwrap();
            sqlx::query("CREATE SCHEMA public")
                .execute(db.pool())
                .await
                .unwrap();
            db.close().await;
        }
    }
    let db = rs.connect().await;
    assert!(balances(&db).await.is_empty());
    let running = start_ledger(&db, &store, config()).await;
    wait_checkpoint(&db, ACCOUNT_BALANCES, last, Duration::from_secs(30)).await;
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, last, Duration::from_secs(30)).await;
    running.stop().await;
    assert_balances(&balances(&db).await, &work);
    assert_eq!(activity_positions(&db).await, log_positions(&store).await);
    db.close().await;
}

/// Set in the environment of the child process that
/// `exactly_once_across_process_kills` starts: "<nats url> <database url>".
const CHILD_ENV: &str = "SLUICE_TEST_CHILD_PROJECTOR";

/// Not a test on its own (returns at once without [`CHILD_ENV`]): the body
/// of the projector process that gets killed with SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_projector_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (nats_url, db_url) = spec.split_once(' ').unwrap();
    let store = EventStore::connect(nats_url, sluice_events::StoreConfig::default())
        .await
        .unwrap();
    let db = Database::connect(db_url).await.unwrap();
    let small = RunnerConfig {
        max_batch: 64,
        ..config()
    };
    let _running = start_ledger(&db, &store, small).await;
    // Normally killed within a second; never outlive a parent that died.
    tokio::time::sleep(Duration::from_secs(60)).await;
}

/// The projector runs in a child process killed with SIGKILL at random
/// points while events flow: no duplicates, no gaps, the same balances.
async fn exactly_once_across_process_kills(backend: Backend) {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let rs = Store::fresh(backend, "sluice_proj").await;
    let db = rs.connect().await;
    let work = workload(500, 40, 29);
    let writer = {
        let store = store.clone();
        let work = work.clone();
        tokio::spawn(async move { append_workload(&store, &work).await })
    };
    let mut rng = Lcg(31);
    let mut progress = Vec::new();
    for _ in 0..5 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_projector_process", "--nocapture"])
            .env(CHILD_ENV, format!("{} {}", nats.url(), rs.url))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300 + rng.next() % 300)).await;
        child.kill().unwrap(); // SIGKILL: no destructor, no rollback by us
        child.wait().unwrap();
        progress.push(read_checkpoint(&db, ACCOUNT_ACTIVITY).await.unwrap());
    }
    assert!(
        progress.iter().any(|p| *p > 0),
        "children never applied anything"
    );
    let last = writer.await.unwrap();
    let running = start_ledger(&db, &store, config()).await;
    wait_checkpoint(&db, ACCOUNT_BALANCES, last, Duration::from_secs(60)).await;
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, last, Duration::from_secs(60)).await;
    running.stop().await;
    eprintln!("{backend:?}: checkpoints after each kill {progress:?}, final {last}");
    assert_eq!(activity_positions(&db).await, log_positions(&store).await);
    assert_balances(&balances(&db).await, &work);
    db.close().await;
}

/// Publishes a deposit the way any NATS client can, bypassing the append's
/// size check: `pad` bytes of padding make it as large as a test needs.
async fn raw_deposit(store: &EventStore, account: &str, pad: usize) -> u64 {
    let mut h = async_nats::HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-source", "urn:raw-client"),
        ("ce-type", sluice_ledger::DEPOSITED),
        ("Content-Type", "application/json"),
    ] {
        h.insert(k, v);
    }
    h.insert("ce-id", uuid_like(account, pad).as_str());
    h.insert("ce-subject", account);
    let body = format!(r#"{{"amount":5,"pad":"{}"}}"#, "x".repeat(pad));
    store
        .jetstream()
        .publish_with_headers(format!("events.account.{account}"), h, body.into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

fn uuid_like(account: &str, pad: usize) -> String {
    format!("raw-{account}-{pad}")
}

/// The rows a projection recorded as dead letters: position -> (kind, reason).
async fn dead_rows(db: &Database, projection: &str) -> BTreeMap<u64, (String, String)> {
    sqlx::query("SELECT position, kind, reason FROM sluice_dead_letters WHERE projection = $1")
        .bind(projection)
        .fetch_all(db.pool())
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get::<i64, _>(0) as u64, (r.get(1), r.get(2))))
        .collect()
}

/// An event over the configured 256 KiB is refused by the decoder (never
/// applied) and dead-lettered as `PayloadTooLarge`; one near the server's
/// `max_payload`, whose copy plus dead-letter headers cannot fit, is
/// dead-lettered by reference; the group keeps applying everything else.
async fn oversized_events_are_dead_lettered_by_reference(backend: Backend) {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let rs = Store::fresh(backend, "sluice_proj").await;
    let db = rs.connect().await;
    let open = |o: &str| AccountEvent::Opened {
        owner: o.into(),
        currency: "EUR".into(),
    };
    for a in ["good", "mid", "big"] {
        append_one(&store, a, &open(a)).await;
    }
    let max = store.client().server_info().max_payload;
    let over = raw_deposit(&store, "mid", 300 * 1024).await;
    let near = raw_deposit(&store, "big", max - 400).await;
    append_one(&store, "good", &AccountEvent::Deposited { amount: 9 }).await;
    let held = append_one(&store, "big", &AccountEvent::Deposited { amount: 3 }).await;
    let last = append_one(&store, "good", &AccountEvent::Deposited { amount: 1 }).await;

    let running = start_ledger(&db, &store, config()).await;
    wait_checkpoint(&db, ACCOUNT_BALANCES, last, Duration::from_secs(30)).await;
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, last, Duration::from_secs(30)).await;
    running.stop().await;
    let b = balances(&db).await;
    assert_eq!(b["good"].0, 10, "the other accounts kept flowing");
    assert_eq!(b["mid"].0, 0, "the 300 KB deposit was not applied");
    assert_eq!(b["big"].0, 0, "neither the big deposit nor what follows it");
    for projection in [ACCOUNT_BALANCES, ACCOUNT_ACTIVITY] {
        let dead = dead_rows(&db, projection).await;
        for p in [over, near] {
            assert_eq!(dead[&p].0, "decode", "{projection} {dead:?}");
            assert!(dead[&p].1.starts_with("PayloadTooLarge"), "{dead:?}");
        }
        assert_eq!(dead[&held].0, "parked", "{dead:?}");
    }

    // The DLQ has both: the 300 KB one in full, the near-limit one by reference.
    let listing = sluice_workers::dlq::list(
        &store,
        &sluice_workers::dlq::Filter {
            consumer: Some("projection-account_balances".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let by_seq: HashMap<u64, &sluice_workers::dlq::DeadLetter> =
        listing.entries.iter().map(|e| (e.sequence, e)).collect();
    assert!(!by_seq[&over].by_reference);
    assert!(by_seq[&over].body.len() > 300 * 1024);
    let big = by_seq[&near];
    assert!(big.by_reference, "{:?}", big.headers);
    assert!(big.body.is_empty());
    assert_eq!(big.headers["Sluice-Dlq-Body"], vec!["reference".to_owned()]);
    assert_eq!(big.event_type.as_deref(), Some(sluice_ledger::DEPOSITED));
    // `show` reads the original back with a direct get.
    let shown = sluice_workers::dlq::show(&store, big.id).await.unwrap();
    assert!(shown.body.len() > max - 1024, "{}", shown.body.len());
    assert!(shown.body.starts_with(br#"{"amount":5"#));
    db.close().await;
}

/// A dead letter that cannot be stored (the DLQ is full) halts the group
/// visibly, applies nothing after the event, and resumes by itself once
/// the DLQ takes it.
async fn a_full_dlq_halts_visibly_and_resumes(backend: Backend) {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let rs = Store::fresh(backend, "sluice_proj").await;
    let db = rs.connect().await;
    let js = store.jetstream().clone();
    sluice_workers::dlq::ensure_streams(&store, 1)
        .await
        .unwrap();
    let mut dlq = js.get_stream("DLQ").await.unwrap();
    let mut cfg = dlq.info().await.unwrap().config.clone();
    let unlimited = cfg.clone();
    cfg.max_messages = 1;
    cfg.discard = async_nats::jetstream::stream::DiscardPolicy::New;
    js.update_stream(cfg).await.unwrap();
    js.publish("dlq.filler.x", "full".into())
        .await
        .unwrap()
        .await
        .unwrap();

    append_one(
        &store,
        "good",
        &AccountEvent::Opened {
            owner: "g".into(),
            currency: "EUR".into(),
        },
    )
    .await;
    let ghost = append_one(&store, "ghost", &AccountEvent::Deposited { amount: 5 }).await;
    let last = append_one(&store, "good", &AccountEvent::Deposited { amount: 9 }).await;
    let running = start_ledger(&db, &store, config()).await;
    let live = running.live[ACCOUNT_BALANCES].clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while live.snapshot().halted.is_none() {
        assert!(
            Instant::now() < deadline,
            "never halted: {:?}",
            live.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snap = live.snapshot();
    assert_eq!(snap.state, RunState::Halted);
    let why = snap.halted.unwrap();
    assert!(
        why.contains("cannot dead-letter") && why.contains("DLQ"),
        "{why}"
    );
    // Its group-mate shares the feed: halted too, and nothing moved on.
    assert_eq!(
        running.live[ACCOUNT_ACTIVITY].snapshot().state,
        RunState::Halted
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(read_checkpoint(&db, ACCOUNT_BALANCES).await.unwrap() < ghost);
    let status = sluice_projections::projection_status(&db, &store, ACCOUNT_BALANCES, Some(&live))
        .await
        .unwrap();
    assert_eq!(status.state, RunState::Halted);

    // The operator makes room: it resumes without a restart.
    js.update_stream(unlimited).await.unwrap();
    wait_checkpoint(&db, ACCOUNT_BALANCES, last, Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while live.snapshot().halted.is_some() {
        assert!(
            Instant::now() < deadline,
            "still halted: {:?}",
            live.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(live.snapshot().state, RunState::Running);
    running.stop().await;
    assert_eq!(balances(&db).await["good"].0, 9);
    assert!(dead_rows(&db, ACCOUNT_BALANCES).await.contains_key(&ghost));
    let _ = dlq.info().await.unwrap();
    db.close().await;
}

both_backends!(
    balances_equal_the_fold,
    exactly_once_across_crashes,
    resumes_from_the_checkpoint,
    transient_failure_blocks_without_skipping,
    dead_letters_park_the_account_only,
    oversized_events_are_dead_lettered_by_reference,
    a_full_dlq_halts_visibly_and_resumes,
    halt_policy_stops_before_the_bad_event,
    rebuild_switches_blue_green_under_load,
    recovers_from_losing_the_read_store,
    exactly_once_across_process_kills,
);

/// Set-based and row-at-a-time `account_balances` fold the same events to
/// the same rows on both backends. Which is faster is a benchmark's question
/// (`sluice-bench projections`), never a timed test's: on a loaded 2-core
/// machine the order of two timings is noise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_based_and_row_at_a_time_agree() {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let work = workload(1000, 20, 9);
    let last = append_workload(&store, &work).await;
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let mut folds = Vec::new();
        for mode in [WriteMode::SetBased, WriteMode::RowAtATime] {
            let rs = Store::fresh(backend, "sluice_proj").await;
            let db = rs.connect().await;
            let running = start_with(
                &db,
                &store,
                vec![Arc::new(AccountBalances::with_mode(mode))],
                config(),
            )
            .await;
            wait_checkpoint(&db, ACCOUNT_BALANCES, last, Duration::from_secs(60)).await;
            running.stop().await;
            let rows = balances(&db).await;
            assert_balances(&rows, &work);
            folds.push(rows);
            db.close().await;
        }
        assert_eq!(folds[0], folds[1], "{backend:?}: the two modes disagree");
    }
}

/// `run_read_side` (what `sluice up` calls) serves the HTTP API over a
/// real socket with the projector running in-process.
#[tokio::test]
async fn run_read_side_serves_http() {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let rs = Store::fresh(Backend::Sqlite, "sluice_proj").await;
    let shutdown = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = {
        let (url, db_url, shutdown) = (nats.url(), rs.url.clone(), shutdown.clone());
        tokio::spawn(async move {
            sluice_ledger::run_read_side(
                &url,
                &db_url,
                "127.0.0.1:0".parse().unwrap(),
                shutdown,
                Some(tx),
            )
            .await
        })
    };
    let addr = rx.await.unwrap();
    let pos = append_one(
        &store,
        "web",
        &AccountEvent::Opened {
            owner: "w".into(),
            currency: "EUR".into(),
        },
    )
    .await;
    // Plain HTTP/1.1 over TCP: no client dependency needed.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(
        format!(
            "GET /v1/projections/account_balances/rows/web?min_position={pos} HTTP/1.1\r\n\
             Host: localhost\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut resp = String::new();
    conn.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"owner\":\"w\""), "{resp}");
    assert!(
        resp.to_lowercase().contains(&format!("etag: \"{pos}\"")),
        "{resp}"
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// `ReadSide::connect` wires NATS and the read store from URLs.
#[tokio::test]
async fn read_side_connects_from_urls() {
    let nats = NatsServer::start();
    let rs = Store::fresh(Backend::Sqlite, "sluice_proj").await;
    let side = ReadSide::connect(&nats.url(), &rs.url).await.unwrap();
    let shutdown = CancellationToken::new();
    let projector = sluice_ledger::Projector::start(&side, config(), shutdown.clone())
        .await
        .unwrap();
    let pos = append_one(
        &side.store,
        "x",
        &AccountEvent::Opened {
            owner: "x".into(),
            currency: "EUR".into(),
        },
    )
    .await;
    wait_checkpoint(&side.db, ACCOUNT_BALANCES, pos, Duration::from_secs(20)).await;
    let _state = projector.app_state(&side);
    shutdown.cancel();
    projector.join().await;
}

/// A TCP proxy in front of PostgreSQL that can be switched off (connections
/// cut, port refusing) and on again: the database "goes away".
struct Proxy {
    addr: std::net::SocketAddr,
    on: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (on, mut rx) = tokio::sync::watch::channel(true);
        tokio::spawn(async move {
            let mut listener = Some(listener);
            loop {
                if *rx.borrow() {
                    let l = match &listener {
                        Some(l) => l,
                        None => {
                            listener = Some(tokio::net::TcpListener::bind(addr).await.unwrap());
                            listener.as_ref().unwrap()
                        }
                    };
                    tokio::select! {
                        accepted = l.accept() => {
                            let Ok((mut client, _)) = accepted else { continue };
                            let mut off = rx.clone();
                            tokio::spawn(async move {
                                let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else { return };
                                tokio::select! {
                                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                                    _ = off.wait_for(|on| !on) => {}
                                }
                            });
                        }
                        r = rx.changed() => if r.is_err() { return },
                    }
                } else {
                    // Off: the port refuses connections.
                    listener = None;
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            }
        });
        Proxy { addr, on }
    }

    fn set(&self, on: bool) {
        let _ = self.on.send(on);
    }
}

/// PostgreSQL unreachable for a while mid-run (connections cut, port
/// refusing): nothing is lost or reordered and the lag goes back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unavailable_mid_run_loses_nothing() {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let rs = Store::fresh(Backend::Postgres, "sluice_proj").await;
    // Migrate directly, then run the projector through the proxy.
    rs.connect().await.close().await;
    // postgres://user@host:port/db -> host:port
    let (scheme, rest) = rs.url.split_once("://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    let (user, host) = authority.rsplit_once('@').unwrap_or(("", authority));
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    };
    let upstream = tokio::net::lookup_host(host.as_str())
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = Proxy::start(upstream).await;
    let at = if user.is_empty() {
        String::new()
    } else {
        format!("{user}@")
    };
    let url = format!("{scheme}://{at}{}/{path}", proxy.addr);
    let db = Database::connect(&url).await.unwrap();
    let work = workload(200, 25, 13);
    let writer = {
        let store = store.clone();
        let work = work.clone();
        tokio::spawn(async move { append_workload(&store, &work).await })
    };
    let running = start_ledger(&db, &store, config()).await;
    // Cut the database off once the projector is applying (on a loaded
    // machine its start can take longer than any fixed sleep).
    let deadline = Instant::now() + Duration::from_secs(20);
    while running.live[ACCOUNT_ACTIVITY].snapshot().checkpoint == 0 {
        assert!(
            Instant::now() < deadline,
            "the projector never started applying"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.set(false);
    let last = writer.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let blocked = loop {
        let live = running.live[ACCOUNT_ACTIVITY].snapshot();
        if live.last_error.is_some() || Instant::now() > deadline {
            break live;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(blocked.checkpoint < last, "{blocked:?}");
    assert!(blocked.last_error.is_some(), "{blocked:?}");
    proxy.set(true);
    wait_checkpoint(&db, ACCOUNT_BALANCES, last, Duration::from_secs(60)).await;
    wait_checkpoint(&db, ACCOUNT_ACTIVITY, last, Duration::from_secs(60)).await;
    wait_error_cleared(&running.live[ACCOUNT_ACTIVITY]).await;
    let status = sluice_projections::projection_status(
        &db,
        &store,
        ACCOUNT_ACTIVITY,
        Some(&running.live[ACCOUNT_ACTIVITY]),
    )
    .await
    .unwrap();
    assert_eq!(status.lag_events, 0);
    assert!(status.last_error.is_none(), "{status:?}");
    running.stop().await;
    assert_eq!(activity_positions(&db).await, log_positions(&store).await);
    assert_balances(&balances(&db).await, &work);
    db.close().await;
}

/// `sluice-bench projections` in small: (a) raw batched upserts, (b) catch-up
/// of both ledger projections, (c) rebuild, on both backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_projections_small() {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let work = sluice_bench::ledger_read_models::workload(1000, 20);
    let last = sluice_bench::ledger_read_models::append(&store, &work)
        .await
        .unwrap();
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let rs = Store::fresh(backend, "sluice_proj").await;
        let db = rs.connect().await;
        // Two rounds: the second catch-up starts from a reset projection.
        let report = sluice_bench::ledger_read_models::run(&store, &db, &work, last, 2)
            .await
            .unwrap();
        eprintln!("{}", serde_json::to_string(&report).unwrap());
        assert_eq!(report.events, 20_000);
        assert_eq!(report.rounds, 2);
        assert!(report.catch_up_events_per_s > 0.0);
        assert!(
            report.catch_up_ratio_min <= report.catch_up_ratio_max,
            "{report:?}"
        );
        db.close().await;
    }
}

/// The CLI's read-side commands as library calls: query, list, rebuild
/// (with progress), reset (refused without confirmation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_query_list_rebuild_reset() {
    use sluice_host::projection_ops as cli;
    let nats = NatsServer::start();
    let rs = Store::fresh(Backend::Sqlite, "sluice_proj").await;
    let ledger = ReadSide::connect(&nats.url(), &rs.url).await.unwrap();
    let app = sluice_host::App::new("sluice").module(sluice_ledger::module());
    let side = sluice_host::ReadSide::open(app, ledger.store.clone(), &rs.url)
        .await
        .unwrap();
    let work = workload(5, 4, 41);
    let last = append_workload(&side.store, &work).await;
    let running = start_ledger(&side.db, &side.store, config()).await;
    wait_checkpoint(&side.db, ACCOUNT_BALANCES, last, Duration::from_secs(20)).await;
    wait_checkpoint(&side.db, ACCOUNT_ACTIVITY, last, Duration::from_secs(20)).await;

    let mut out = Vec::new();
    cli::query(
        &side,
        ACCOUNT_BALANCES,
        Some("acc-2"),
        None,
        100,
        true,
        &mut out,
    )
    .await
    .unwrap();
    let row: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(row["balance"], work[2].2);

    let mut out = Vec::new();
    cli::query(&side, ACCOUNT_ACTIVITY, None, None, 3, false, &mut out)
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 4, "3 rows and the cursor: {text}");
    assert!(text.contains("(more: --after"), "{text}");

    let err = cli::query(&side, "nope", None, None, 3, false, &mut Vec::new())
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 2);

    let mut out = Vec::new();
    cli::list(&side, false, &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("account_balances") && text.contains("running"),
        "{text}"
    );

    let mut progress = Vec::new();
    let done = cli::rebuild(
        &side,
        ACCOUNT_BALANCES,
        &mut progress,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(done);
    let text = String::from_utf8(progress).unwrap();
    assert!(text.contains("switched to the rebuilt tables"), "{text}");

    let err = cli::reset(&side, ACCOUNT_ACTIVITY, false)
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 2);
    cli::reset(&side, ACCOUNT_ACTIVITY, true).await.unwrap();
    // The running projector follows the reset and replays.
    wait_checkpoint(&side.db, ACCOUNT_ACTIVITY, last, Duration::from_secs(20)).await;
    running.stop().await;
    assert_eq!(
        activity_positions(&side.db).await,
        log_positions(&side.store).await
    );
    assert_balances(&balances(&side.db).await, &work);
}
