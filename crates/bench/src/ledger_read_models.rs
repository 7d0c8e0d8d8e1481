//! `sluice-bench projections`: the ledger read models against the limit of
//! the database (raw batched upserts of the same rows), catch-up and rebuild.
//! Public, so tests seed the same workload and run the same figures in small.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use serde::Serialize;
use sluice_events::{EventStore, ExpectedVersion, NewEvent, StreamId};
use sluice_projections::{Database, Member, RunnerConfig, read_checkpoint};
use tokio_util::sync::CancellationToken;

use sluice_ledger::{
    ACCOUNT_ACTIVITY, ACCOUNT_BALANCES, ACCOUNT_CATEGORY, AccountActivity, AccountBalances,
    AccountEvent,
};

use crate::{Error, stats};

/// Figures of one run on one database.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    /// Events in the log.
    pub events: u64,
    /// (a) Raw batched upserts of the same rows, 1,000 events per
    /// transaction, no log: the limit.
    pub raw_upsert_events_per_s: f64,
    /// (b) Catch-up of `account_balances` + `account_activity` from
    /// position 1 (one group: one feed from nats-server, one transaction
    /// per batch).
    pub catch_up_events_per_s: f64,
    /// (b) / (a) of the medians; the target is >= 0.7.
    pub catch_up_ratio: f64,
    /// Rounds of (a) and (b), interleaved; (a) and (b) are their medians.
    pub rounds: usize,
    /// The lowest (b) / (a) of one round.
    pub catch_up_ratio_min: f64,
    /// The highest (b) / (a) of one round.
    pub catch_up_ratio_max: f64,
    /// (a) and (b) of every round, in order, events per second.
    pub round_rates: Vec<(f64, f64)>,
    /// (c) Blue/green rebuild of both projections, one after the other
    /// (events applied per second, each projection counted).
    pub rebuild_events_per_s: f64,
    /// (d) The same two rebuilt together (`rebuild_group`: one feed, one
    /// switch), each projection counted.
    pub group_rebuild_events_per_s: f64,
    /// (e) Events in the last tenth of the log, replayed by both
    /// projections (`replay --from`) while the live group runs.
    pub replay_tail_events: u64,
    /// (e) Accounts `account_balances` re-folded from their earlier events.
    pub replay_accounts_refolded: usize,
    /// (e) Wall time of `account_activity`'s replay until it has caught up
    /// again, in seconds (rewind by position: a delete, then the runner).
    pub replay_activity_seconds: f64,
    /// (e) The same for `account_balances` (rewind by aggregate: reading
    /// the re-folded accounts' earlier events from the log dominates).
    pub replay_balances_seconds: f64,
}

/// A deterministic ledger workload: `accounts` accounts, each opened and
/// then deposited to / withdrawn from (never overdrawn); `per_account`
/// events each.
pub fn workload(accounts: usize, per_account: usize) -> Vec<(String, Vec<AccountEvent>)> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        state >> 33
    };
    (0..accounts)
        .map(|a| {
            let mut events = vec![AccountEvent::Opened {
                owner: format!("owner-{a}"),
                currency: "EUR".to_owned(),
            }];
            let mut balance = 0i64;
            for _ in 1..per_account {
                let amount = i64::try_from(next() % 10_000 + 1).unwrap_or(1);
                if next() % 3 == 0 && amount <= balance {
                    balance -= amount;
                    events.push(AccountEvent::Withdrawn { amount });
                } else {
                    balance += amount;
                    events.push(AccountEvent::Deposited { amount });
                }
            }
            (format!("acc-{a}"), events)
        })
        .collect()
}

/// Appends a workload (accounts concurrently, each in order); returns the
/// last position.
pub async fn append(
    store: &EventStore,
    work: &[(String, Vec<AccountEvent>)],
) -> Result<u64, Error> {
    let results: Vec<Result<u64, Error>> = futures::stream::iter(work.to_vec())
        .map(|(id, events)| {
            let store = store.clone();
            async move {
                let sid = StreamId::new(ACCOUNT_CATEGORY, id)?;
                let mut last = 0;
                for chunk in events.chunks(100) {
                    let new: Vec<NewEvent> = chunk.iter().map(AccountEvent::to_new_event).collect();
                    last = store.append(&sid, ExpectedVersion::Any, new).await?.version;
                }
                Ok(last)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut last = 0;
    for r in results {
        last = last.max(r?);
    }
    Ok(last)
}

/// Runs (a), (b), (c) on `db` (fresh: empty ledger tables) over the events
/// already in `store`, which must hold only `work`.
pub async fn run(
    store: &EventStore,
    db: &Database,
    work: &[(String, Vec<AccountEvent>)],
    last: u64,
    reps: usize,
) -> Result<BenchReport, Error> {
    sluice_ledger::migrate(db).await?;
    let backend = match db.backend() {
        sluice_projections::Backend::Sqlite => "sqlite",
        sluice_projections::Backend::Postgres => "postgres",
    };
    let events: u64 = work.iter().map(|(_, e)| e.len() as u64).sum();

    // (a) and (b) alternate, so a swing of the machine hits both alike.
    let mut rounds: Vec<(f64, f64)> = Vec::new();
    for _ in 0..reps.max(1) {
        let raw = raw_upserts(db, work, events).await?;
        let catch_up = catch_up(store, db, last, events).await?;
        rounds.push((raw, catch_up));
    }
    let ratios: Vec<f64> = rounds.iter().map(|(r, c)| c / r).collect();
    let (catch_up_ratio_min, catch_up_ratio_max) = stats::range(&ratios);
    let raw = stats::median(&rounds.iter().map(|r| r.0).collect::<Vec<_>>());
    let catch_up = stats::median(&rounds.iter().map(|r| r.1).collect::<Vec<_>>());
    // The live group for (e), resuming at the end of the log.
    let shutdown = CancellationToken::new();
    let config = RunnerConfig::default();
    let group = ledger_group(store, db, &config, &shutdown).await?;

    // (c) Rebuild both while the live runners idle.
    let t0 = Instant::now();
    sluice_projections::rebuild(
        Arc::new(AccountBalances::new()),
        db.clone(),
        store.clone(),
        config.clone(),
        |_| {},
        shutdown.child_token(),
    )
    .await?;
    sluice_projections::rebuild(
        Arc::new(AccountActivity),
        db.clone(),
        store.clone(),
        config.clone(),
        |_| {},
        shutdown.child_token(),
    )
    .await?;
    let rebuild = 2.0 * events as f64 / t0.elapsed().as_secs_f64().max(1e-6);

    // (d) Both rebuilt together.
    let t0 = Instant::now();
    sluice_projections::rebuild_group(
        vec![
            Member::from(Arc::new(AccountBalances::new())),
            Member::from(Arc::new(AccountActivity)),
        ],
        db.clone(),
        store.clone(),
        config,
        |_| {},
        shutdown.child_token(),
    )
    .await?;
    let group_rebuild = 2.0 * events as f64 / t0.elapsed().as_secs_f64().max(1e-6);

    // (e) Replay the last tenth while the live group runs, one projection
    // after the other.
    let from = (last - last / 10).max(1);
    let (_, replay_activity_seconds) = replay_tail(
        store,
        db,
        Member::from(Arc::new(AccountActivity)),
        from,
        last,
    )
    .await?;
    let (balances, replay_balances_seconds) = replay_tail(
        store,
        db,
        Member::from(Arc::new(AccountBalances::new())),
        from,
        last,
    )
    .await?;
    shutdown.cancel();
    let _ = group.task.await;
    for table in ["bench_raw_balances", "bench_raw_activity"] {
        sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
            .execute(db.pool())
            .await
            .map_err(sluice_projections::Error::from)?;
    }
    Ok(BenchReport {
        backend,
        events,
        raw_upsert_events_per_s: raw,
        catch_up_events_per_s: catch_up,
        catch_up_ratio: catch_up / raw,
        rounds: rounds.len(),
        round_rates: rounds.clone(),
        catch_up_ratio_min,
        catch_up_ratio_max,
        rebuild_events_per_s: rebuild,
        group_rebuild_events_per_s: group_rebuild,
        replay_tail_events: last - from + 1,
        replay_accounts_refolded: balances.aggregates_refolded,
        replay_activity_seconds,
        replay_balances_seconds,
    })
}

/// (a) The same rows as the projections write, straight into scratch copies
/// of the tables in 1,000-event transactions; events per second.
async fn raw_upserts(
    db: &Database,
    work: &[(String, Vec<AccountEvent>)],
    events: u64,
) -> Result<f64, Error> {
    for (table, like) in [
        ("bench_raw_balances", ACCOUNT_BALANCES),
        ("bench_raw_activity", ACCOUNT_ACTIVITY),
    ] {
        sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
            .execute(db.pool())
            .await
            .map_err(sluice_projections::Error::from)?;
        let ddl = if like == ACCOUNT_BALANCES {
            "(id TEXT PRIMARY KEY, owner TEXT NOT NULL, currency TEXT NOT NULL, balance BIGINT NOT NULL, \
             version BIGINT NOT NULL, status TEXT NOT NULL, updated_at TEXT NOT NULL)"
        } else {
            "(position BIGINT PRIMARY KEY, account TEXT NOT NULL, event_type TEXT NOT NULL, \
             amount BIGINT, time TEXT NOT NULL)"
        };
        sqlx::query(&format!("CREATE TABLE {table} {ddl}"))
            .execute(db.pool())
            .await
            .map_err(sluice_projections::Error::from)?;
        // The same indexes as the projection's table, so the raw rate is the
        // limit for these rows in this table shape, not in a cheaper one.
        if like == ACCOUNT_ACTIVITY {
            sqlx::query(&format!(
                "CREATE INDEX IF NOT EXISTS {table}_by_account ON {table} (account, position)"
            ))
            .execute(db.pool())
            .await
            .map_err(sluice_projections::Error::from)?;
        }
    }
    // Interleave accounts like the log does, so batches touch many accounts.
    let mut flat: Vec<(&str, &AccountEvent)> = Vec::with_capacity(events as usize);
    let longest = work.iter().map(|(_, e)| e.len()).max().unwrap_or(0);
    for i in 0..longest {
        for (id, evs) in work {
            if let Some(e) = evs.get(i) {
                flat.push((id.as_str(), e));
            }
        }
    }
    let t0 = Instant::now();
    let mut balances: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for (n, chunk) in flat.chunks(1000).enumerate() {
        let mut tx = db
            .pool()
            .begin()
            .await
            .map_err(sluice_projections::Error::from)?;
        let base = (n * 1000) as i64;
        let mut touched: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
        for (id, e) in chunk {
            let b = balances.entry(id).or_insert(0);
            match e {
                AccountEvent::Deposited { amount } => *b += amount,
                AccountEvent::Withdrawn { amount } => *b -= amount,
                _ => {}
            }
            touched.insert(id, *b);
        }
        for part in chunk.chunks(500).enumerate() {
            let (p, rows) = part;
            let sql = format!(
                "INSERT INTO bench_raw_activity (position, account, event_type, amount, time) VALUES {}",
                values(rows.len(), 5)
            );
            let mut q = sqlx::query(&sql);
            for (i, (id, e)) in rows.iter().enumerate() {
                q = q
                    .bind(base + (p * 500 + i) as i64 + 1)
                    .bind(*id)
                    .bind(e.event_type())
                    .bind(e.amount())
                    .bind("2026-01-01T00:00:00Z");
            }
            q.execute(&mut *tx)
                .await
                .map_err(sluice_projections::Error::from)?;
        }
        let touched: Vec<(&str, i64)> = touched.into_iter().collect();
        for rows in touched.chunks(500) {
            let sql = format!(
                "INSERT INTO bench_raw_balances (id, owner, currency, balance, version, status, updated_at) \
                 VALUES {} ON CONFLICT (id) DO UPDATE SET balance = excluded.balance, \
                 version = excluded.version, updated_at = excluded.updated_at",
                values(rows.len(), 7)
            );
            let mut q = sqlx::query(&sql);
            for (id, b) in rows {
                q = q
                    .bind(*id)
                    .bind("owner")
                    .bind("EUR")
                    .bind(*b)
                    .bind(base)
                    .bind("open")
                    .bind("2026-01-01T00:00:00Z");
            }
            q.execute(&mut *tx)
                .await
                .map_err(sluice_projections::Error::from)?;
        }
        tx.commit().await.map_err(sluice_projections::Error::from)?;
    }
    let raw = events as f64 / t0.elapsed().as_secs_f64().max(1e-6);
    Ok(raw)
}

/// (e) Replays `member` from `from` and waits until the live group has
/// brought it back to `last`: the report and the seconds it took.
async fn replay_tail(
    store: &EventStore,
    db: &Database,
    member: Member,
    from: u64,
    last: u64,
) -> Result<(sluice_projections::ReplayReport, f64), Error> {
    let name = member.name();
    let t0 = Instant::now();
    let report = sluice_projections::replay(member, db.clone(), store.clone(), from).await?;
    while read_checkpoint(db, name).await? < last {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    Ok((report, t0.elapsed().as_secs_f64()))
}

/// Both ledger projections as one group, as `sluice up` runs them: one
/// feed, one transaction per batch.
async fn ledger_group(
    store: &EventStore,
    db: &Database,
    config: &RunnerConfig,
    shutdown: &CancellationToken,
) -> Result<sluice_projections::RunningGroup, Error> {
    Ok(sluice_projections::spawn_group(
        vec![
            Member::from(Arc::new(AccountBalances::new())),
            Member::from(Arc::new(AccountActivity)),
        ],
        db.clone(),
        store.clone(),
        config.clone(),
        shutdown.clone(),
    )
    .await?)
}

/// (b) Both ledger projections from position 1, as `sluice up` runs them;
/// events per second. Resets them first and stops them after.
async fn catch_up(store: &EventStore, db: &Database, last: u64, events: u64) -> Result<f64, Error> {
    sluice_projections::reset(db, &AccountBalances::new()).await?;
    sluice_projections::reset(db, &AccountActivity).await?;
    // The reset's DELETEs leave the previous round's rows behind as dead
    // tuples and index entries; the raw phase writes into fresh tables, so
    // start from fresh files likewise (SQLite reuses free pages by itself).
    if db.backend() == sluice_projections::Backend::Postgres {
        sqlx::query(&format!("TRUNCATE {ACCOUNT_BALANCES}, {ACCOUNT_ACTIVITY}"))
            .execute(db.pool())
            .await
            .map_err(sluice_projections::Error::from)?;
    }
    let shutdown = CancellationToken::new();
    let t0 = Instant::now();
    let config = RunnerConfig::default();
    let group = ledger_group(store, db, &config, &shutdown).await?;
    loop {
        let done = read_checkpoint(db, ACCOUNT_BALANCES).await? >= last
            && read_checkpoint(db, ACCOUNT_ACTIVITY).await? >= last;
        if done {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let catch_up = events as f64 / t0.elapsed().as_secs_f64().max(1e-6);
    shutdown.cancel();
    let _ = group.task.await;
    Ok(catch_up)
}

fn values(rows: usize, cols: usize) -> String {
    (0..rows)
        .map(|r| {
            let cells: Vec<String> = (1..=cols).map(|c| format!("${}", r * cols + c)).collect();
            format!("({})", cells.join(","))
        })
        .collect::<Vec<_>>()
        .join(",")
}
