//! Blue/green rebuild: build copies of a projection's tables from position 1
//! while the live tables keep serving (and the live runner keeps applying),
//! then swap them in with one transaction.
//!
//! Resumable: the copies have their own checkpoint (`<name>__rebuild`), so an
//! interrupted rebuild continues where it stopped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sluice_events::EventStore;
use sqlx::Row;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::db::is_transient;
use crate::db::{Backend, Database};
use crate::error::Error;
use crate::projection::{Projection, REBUILD_SUFFIX, Tables};
use crate::runner::{Member, Runner, RunnerConfig, read_checkpoint, to_u64, unix_ms};

/// Where a rebuild is, for a progress bar.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildProgress {
    /// The projection.
    pub projection: String,
    /// Position the copies have reached.
    pub position: u64,
    /// Last position of the log (moves while events flow).
    pub target: u64,
    /// Rate since the rebuild (or its resumption) started.
    pub events_per_second: f64,
    /// Estimated seconds left at that rate.
    pub eta_seconds: Option<f64>,
}

/// The outcome of a finished rebuild.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildReport {
    /// The checkpoint the new tables went live at.
    pub position: u64,
    /// Wall time of this run.
    pub elapsed: Duration,
    /// Events per second of this run.
    pub events_per_second: f64,
}

/// Rebuilds `projection` blue/green. Returns `None` when `shutdown` stopped
/// it first (run it again to resume).
pub async fn rebuild<P: Projection>(
    projection: Arc<P>,
    db: Database,
    store: EventStore,
    config: RunnerConfig,
    progress: impl FnMut(&RebuildProgress) + Send,
    shutdown: CancellationToken,
) -> Result<Option<RebuildReport>, Error> {
    rebuild_group(
        vec![Member::from(projection)],
        db,
        store,
        config,
        progress,
        shutdown,
    )
    .await
}

/// Rebuilds several projections blue/green together: one feed builds all
/// their copies, and one transaction switches them all, so they go live
/// consistent with each other (e.g. the members of a projection group).
/// Returns `None` when `shutdown` stopped it first (run it again to resume).
pub async fn rebuild_group(
    members: Vec<Member>,
    db: Database,
    store: EventStore,
    config: RunnerConfig,
    mut progress: impl FnMut(&RebuildProgress) + Send,
    shutdown: CancellationToken,
) -> Result<Option<RebuildReport>, Error> {
    if members.is_empty() {
        return Err(Error::InvalidConfig(
            "a rebuild needs at least one projection",
        ));
    }
    let parts: Vec<Part> = members
        .iter()
        .map(|m| Part {
            name: m.name(),
            key: format!("{}{REBUILD_SUFFIX}", m.name()),
            tables: m.0.dyn_tables(),
        })
        .collect();
    let name = parts.iter().map(|p| p.name).collect::<Vec<_>>().join(",");
    for p in &parts {
        prepare_tables(&db, p.tables, &p.key).await?;
    }
    let copies_at = || async {
        let mut low = u64::MAX;
        for p in &parts {
            low = low.min(read_checkpoint(&db, &p.key).await?);
        }
        Ok::<u64, Error>(low)
    };
    let started = Instant::now();
    let start_position = copies_at().await?;
    tracing::info!(projection = %name, from = start_position, "rebuild starting");
    let name = name.as_str();
    loop {
        let stop = shutdown.child_token();
        let runner = Runner::group(members.clone(), db.clone(), store.clone(), config.clone())
            .await?
            .for_rebuild();
        let task = tokio::spawn(runner.run(stop.clone()));
        let caught_up = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break false,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            if task.is_finished() {
                break true;
            }
            let position = copies_at().await?;
            let target = store.stream_state().await?.last_position;
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            let rate = position.saturating_sub(start_position) as f64 / secs;
            progress(&RebuildProgress {
                projection: name.to_owned(),
                position,
                target,
                events_per_second: rate,
                eta_seconds: (rate > 0.0).then(|| target.saturating_sub(position) as f64 / rate),
            });
            if position >= target {
                break true;
            }
        };
        // The copies get no more writes from here on: stop their runner
        // before switching.
        stop.cancel();
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(join) => {
                return Err(Error::Task("rebuild", join.to_string()));
            }
        }
        if !caught_up || shutdown.is_cancelled() {
            tracing::info!(
                projection = name,
                "rebuild interrupted; run it again to resume"
            );
            return Ok(None);
        }
        if let Some(position) = switch_retrying(&db, &parts).await? {
            let elapsed = started.elapsed();
            let report = RebuildReport {
                position,
                elapsed,
                events_per_second: position.saturating_sub(start_position) as f64
                    / elapsed.as_secs_f64().max(1e-3),
            };
            tracing::info!(
                projection = name,
                position,
                ?elapsed,
                "rebuild switched over"
            );
            return Ok(Some(report));
        }
        // The live tables got ahead while we stopped: catch up and retry.
    }
}

/// Empties `projection`'s tables and sets its checkpoint to 0 in one
/// transaction, forgetting its parked aggregates and dead-letter records: a
/// running runner follows the moved checkpoint and replays the log from
/// position 1 (queries see empty, then filling tables: prefer [`rebuild`]
/// to stay online). Dead letters already in the `DLQ` stream are not
/// written twice within its duplicate window.
pub async fn reset<P: Projection>(db: &Database, projection: &P) -> Result<(), Error> {
    reset_tables(db, projection.name(), projection.tables()).await
}

/// [`reset`] of a projection known only as a [`Member`] (e.g. one of the
/// projections a host runs for a domain).
pub async fn reset_member(db: &Database, member: &Member) -> Result<(), Error> {
    reset_tables(db, member.name(), member.0.dyn_tables()).await
}

async fn reset_tables(
    db: &Database,
    name: &'static str,
    tables: &'static [&'static str],
) -> Result<(), Error> {
    let mut tx = db.pool().begin().await?;
    // The checkpoint row first: it is what a running runner locks.
    sqlx::query(
        "UPDATE sluice_checkpoints SET position = 0, event_time_ms = 0, updated_at_ms = $1, \
         halted_at_position = NULL, halted_reason = NULL WHERE projection = $2",
    )
    .bind(unix_ms(OffsetDateTime::now_utc()))
    .bind(name)
    .execute(&mut *tx)
    .await?;
    for table in tables {
        sqlx::query(&format!("DELETE FROM {table}"))
            .execute(&mut *tx)
            .await?;
    }
    for t in ["sluice_parked", "sluice_dead_letters"] {
        sqlx::query(&format!("DELETE FROM {t} WHERE projection = $1"))
            .bind(name)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    tracing::warn!(
        projection = name,
        "projection reset: replaying from position 1"
    );
    // The DELETEs leave every old row behind as a dead tuple, which slows
    // the replay now starting until autovacuum comes by. VACUUM cannot run
    // in the transaction and does not block readers or writers; a failure
    // only costs speed.
    if db.backend() == Backend::Postgres {
        for table in tables {
            if let Err(e) = sqlx::query(&format!("VACUUM {table}"))
                .execute(db.pool())
                .await
            {
                tracing::warn!(projection = name, table, error = %e, "vacuum after reset failed; autovacuum will catch up");
            }
        }
    }
    Ok(())
}

/// One projection of a rebuild: its name, the key of its copies'
/// checkpoint, its tables.
struct Part {
    name: &'static str,
    key: String,
    tables: &'static [&'static str],
}

/// [`switch`], retried when the database gives up on it for a transient
/// reason (a deadlock with a writer locking in another order, a
/// serialization failure): nothing of a failed switch survives.
async fn switch_retrying(db: &Database, parts: &[Part]) -> Result<Option<u64>, Error> {
    let mut delay = Duration::from_millis(50);
    for _ in 0..10 {
        match switch(db, parts).await {
            Err(Error::Database(e)) if is_transient(&e) => {
                tracing::warn!(error = %e, "rebuild switch failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
    switch(db, parts).await
}

/// Creates the rebuild copies of `tables` (same columns, keys and indexes)
/// unless they exist; forgets a rebuild checkpoint whose tables are gone.
async fn prepare_tables(db: &Database, tables: &[&str], key: &str) -> Result<(), Error> {
    let mut all_exist = true;
    for table in tables {
        let copy = Tables::REBUILD.name(table);
        if !table_exists(db, &copy).await? {
            all_exist = false;
            create_copy(db, table, &copy).await?;
        }
    }
    if !all_exist {
        // Some copies are new: whatever checkpoint an earlier rebuild left
        // does not describe them. Start from position 1 on empty copies.
        for table in tables {
            let copy = Tables::REBUILD.name(table);
            sqlx::query(&format!("DELETE FROM {copy}"))
                .execute(db.pool())
                .await?;
        }
        for t in ["sluice_checkpoints", "sluice_parked", "sluice_dead_letters"] {
            sqlx::query(&format!("DELETE FROM {t} WHERE projection = $1"))
                .bind(key)
                .execute(db.pool())
                .await?;
        }
    }
    Ok(())
}

async fn table_exists(db: &Database, table: &str) -> Result<bool, Error> {
    let sql = match db.backend() {
        Backend::Sqlite => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = $1",
        Backend::Postgres => {
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name = $1"
        }
    };
    let n: i64 = sqlx::query(sql)
        .bind(table)
        .fetch_one(db.pool())
        .await?
        .try_get(0)?;
    Ok(n > 0)
}

/// `CREATE TABLE copy` with the schema of `table`. The one place where the
/// SQL differs by backend: PostgreSQL copies with `LIKE ... INCLUDING ALL`;
/// SQLite replays the table's and its indexes' DDL under the new names.
async fn create_copy(db: &Database, table: &str, copy: &str) -> Result<(), Error> {
    match db.backend() {
        Backend::Postgres => {
            sqlx::query(&format!("CREATE TABLE {copy} (LIKE {table} INCLUDING ALL)"))
                .execute(db.pool())
                .await?;
        }
        Backend::Sqlite => {
            let rows = sqlx::query(
                "SELECT type, name, sql FROM sqlite_master \
                 WHERE tbl_name = $1 AND sql IS NOT NULL ORDER BY type DESC",
            )
            .bind(table)
            .fetch_all(db.pool())
            .await?;
            let mut tx = db.pool().begin().await?;
            for r in rows {
                let kind: String = r.try_get(0)?;
                let name: String = r.try_get(1)?;
                let sql: String = r.try_get(2)?;
                let ddl = if kind == "table" {
                    replace_ident(&sql, table, copy)
                } else {
                    // Index names alternate between two forms so a copy's
                    // index never collides with the live table's.
                    let renamed = match name.strip_suffix(REBUILD_SUFFIX) {
                        Some(base) => base.to_owned(),
                        None => format!("{name}{REBUILD_SUFFIX}"),
                    };
                    replace_ident(&replace_ident(&sql, &name, &renamed), table, copy)
                };
                sqlx::query(&ddl).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
    }
    Ok(())
}

/// Replaces whole identifiers (not substrings of longer ones).
fn replace_ident(sql: &str, from: &str, to: &str) -> String {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(sql.len() + 16);
    let mut rest = sql;
    while let Some(i) = rest.find(from) {
        let before = rest[..i].chars().next_back();
        let after = rest[i + from.len()..].chars().next();
        out.push_str(&rest[..i]);
        if before.is_some_and(is_ident) || after.is_some_and(is_ident) {
            out.push_str(from);
        } else {
            out.push_str(to);
        }
        rest = &rest[i + from.len()..];
    }
    out.push_str(rest);
    out
}

/// The atomic switch: if every projection's copies are at least as far as
/// its live tables, drop the live tables, rename the copies, move the
/// checkpoints and the parked / dead-letter records, all in one
/// transaction. `None` when some live tables are ahead. Returns the lowest
/// position a projection went live at.
async fn switch(db: &Database, parts: &[Part]) -> Result<Option<u64>, Error> {
    for p in parts {
        sqlx::query(
            "INSERT INTO sluice_checkpoints (projection, position) VALUES ($1, 0) \
             ON CONFLICT (projection) DO NOTHING",
        )
        .bind(p.name)
        .execute(db.pool())
        .await?;
    }
    // Lock the live checkpoints first, in name order (as the runner does):
    // a live runner's next batch waits (or fails its compare-and-set and
    // follows the new checkpoint).
    let mut ordered: Vec<&Part> = parts.iter().collect();
    ordered.sort_by_key(|p| p.name);
    let mut tx = db.pool().begin().await?;
    for p in &ordered {
        sqlx::query("UPDATE sluice_checkpoints SET position = position WHERE projection = $1")
            .bind(p.name)
            .execute(&mut *tx)
            .await?;
    }
    let position_of = |r: Option<sqlx::any::AnyRow>| -> Result<(i64, i64), sqlx::Error> {
        match r {
            Some(r) => Ok((r.try_get(0)?, r.try_get(1)?)),
            None => Ok((0, 0)),
        }
    };
    let select = "SELECT position, event_time_ms FROM sluice_checkpoints WHERE projection = $1";
    let mut copies = Vec::with_capacity(parts.len());
    for p in parts {
        let (live, _) = position_of(
            sqlx::query(select)
                .bind(p.name)
                .fetch_optional(&mut *tx)
                .await?,
        )?;
        let (copy, copy_time) = position_of(
            sqlx::query(select)
                .bind(p.key.as_str())
                .fetch_optional(&mut *tx)
                .await?,
        )?;
        if copy < live {
            tx.rollback().await?;
            return Ok(None);
        }
        copies.push((copy, copy_time));
    }
    for (p, (copy, copy_time)) in parts.iter().zip(&copies) {
        for table in p.tables {
            sqlx::query(&format!("DROP TABLE {table}"))
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!(
                "ALTER TABLE {} RENAME TO {table}",
                Tables::REBUILD.name(table)
            ))
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE sluice_checkpoints SET position = $1, event_time_ms = $2, updated_at_ms = $3, \
             halted_at_position = NULL, halted_reason = NULL WHERE projection = $4",
        )
        .bind(*copy)
        .bind(*copy_time)
        .bind(unix_ms(OffsetDateTime::now_utc()))
        .bind(p.name)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM sluice_checkpoints WHERE projection = $1")
            .bind(p.key.as_str())
            .execute(&mut *tx)
            .await?;
        for t in ["sluice_parked", "sluice_dead_letters"] {
            sqlx::query(&format!("DELETE FROM {t} WHERE projection = $1"))
                .bind(p.name)
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!(
                "UPDATE {t} SET projection = $1 WHERE projection = $2"
            ))
            .bind(p.name)
            .bind(p.key.as_str())
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(copies.iter().map(|(c, _)| to_u64(*c)).min())
}

#[cfg(test)]
mod tests {
    use super::replace_ident;

    #[test]
    fn identifiers_are_replaced_whole() {
        assert_eq!(
            replace_ident(
                "CREATE INDEX account_activity_by_account ON account_activity (account)",
                "account_activity",
                "account_activity__rebuild"
            ),
            "CREATE INDEX account_activity_by_account ON account_activity__rebuild (account)"
        );
        assert_eq!(
            replace_ident("CREATE TABLE \"t\" (t_id BIGINT)", "t", "t2"),
            "CREATE TABLE \"t2\" (t_id BIGINT)"
        );
    }
}
