//! The one owner of the SQL of the runtime's bookkeeping tables, kept next
//! to the read models (schema in `migrations/1001_projection_bookkeeping.sql`):
//!
//! - `sluice_checkpoints`: per projection key, the last stream sequence whose
//!   effect is in the read model, and the halt the `halt` policy recorded;
//! - `sluice_parked`: aggregates held behind a dead letter, per projection key;
//! - `sluice_dead_letters`: every event a projection did not apply, with why.
//!
//! A projection key is the projection's name, or `<name>__rebuild` for the
//! copies a rebuild builds. The runner, replay, redrive, rebuild, the dead
//! letter operations and the status all read and write these tables through
//! the functions here, on a pool or inside their own transaction (any
//! [`Executor`]), so the statements and their locking rules live in one place.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use sluice_workers::dlq::Kind as DeadLetterKind;
use sqlx::{Any, AnyConnection, Executor, Row};
use time::OffsetDateTime;

use crate::db::Database;
use crate::error::Error;

/// A stream sequence as stored (BIGINT).
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored BIGINT as a stream sequence (a negative one reads as 0).
pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Unix milliseconds, as the tables store times.
pub(crate) fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// The reason recorded for an event held behind the dead letter at `head`.
pub(crate) fn parked_reason(head: u64) -> String {
    format!("parked behind the dead letter at position {head} of the same aggregate")
}

// ---- checkpoints ----

/// The stored checkpoint of `projection` (0 when it never ran).
pub async fn read_checkpoint(db: &Database, projection: &str) -> Result<u64, Error> {
    Ok(checkpoint(db.pool(), projection).await?)
}

/// The stored checkpoint of `key` (0 when there is no row).
pub(crate) async fn checkpoint(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
) -> Result<u64, sqlx::Error> {
    Ok(stored_checkpoint(ex, key).await?.unwrap_or(0))
}

/// The stored checkpoint of `key`, `None` when there is no row.
pub(crate) async fn stored_checkpoint(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
) -> Result<Option<u64>, sqlx::Error> {
    sqlx::query("SELECT position FROM sluice_checkpoints WHERE projection = $1")
        .bind(key)
        .fetch_optional(ex)
        .await?
        .map(|r| r.try_get::<i64, _>(0).map(to_u64))
        .transpose()
}

/// The stored `(position, event_time_ms)` of `key`, `(0, 0)` when there is no row.
pub(crate) async fn checkpoint_and_time(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
) -> Result<(i64, i64), sqlx::Error> {
    let row =
        sqlx::query("SELECT position, event_time_ms FROM sluice_checkpoints WHERE projection = $1")
            .bind(key)
            .fetch_optional(ex)
            .await?;
    match row {
        Some(r) => Ok((r.try_get(0)?, r.try_get(1)?)),
        None => Ok((0, 0)),
    }
}

/// The stored checkpoint of `key` and the halt recorded on it, if any:
/// `(position, Some((halted_at_position, reason)))`. `None` without a row.
pub(crate) async fn checkpoint_and_halt(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
) -> Result<Option<(u64, Option<(u64, String)>)>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT position, halted_at_position, halted_reason FROM sluice_checkpoints \
         WHERE projection = $1",
    )
    .bind(key)
    .fetch_optional(ex)
    .await?;
    let Some(r) = row else {
        return Ok(None);
    };
    let halted_at: Option<i64> = r.try_get(1)?;
    let reason: Option<String> = r.try_get(2)?;
    Ok(Some((
        to_u64(r.try_get(0)?),
        halted_at.map(|p| (to_u64(p), reason.unwrap_or_default())),
    )))
}

/// Creates `key`'s checkpoint row at 0 unless it exists.
pub(crate) async fn ensure_checkpoint(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO sluice_checkpoints (projection, position) VALUES ($1, 0) \
         ON CONFLICT (projection) DO NOTHING",
    )
    .bind(key)
    .execute(ex)
    .await?;
    Ok(())
}

/// Forgets the halt recorded on `key` (a restart is the operator's "try again").
pub(crate) async fn clear_halt(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE sluice_checkpoints SET halted_at_position = NULL, halted_reason = NULL \
         WHERE projection = $1",
    )
    .bind(key)
    .execute(ex)
    .await?;
    Ok(())
}

/// Records that the `halt` policy stopped `key` before `position`.
pub(crate) async fn record_halt(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
    position: u64,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE sluice_checkpoints SET halted_at_position = $1, halted_reason = $2 \
         WHERE projection = $3",
    )
    .bind(to_i64(position))
    .bind(reason)
    .bind(key)
    .execute(ex)
    .await?;
    Ok(())
}

/// Moves `key`'s checkpoint from `expected` to `position` (compare-and-set);
/// false when it is not at `expected` (another writer moved it).
pub(crate) async fn advance_checkpoint(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
    expected: u64,
    position: u64,
    event_time_ms: i64,
    now_ms: i64,
) -> Result<bool, sqlx::Error> {
    let moved = sqlx::query(
        "UPDATE sluice_checkpoints SET position = $1, event_time_ms = $2, updated_at_ms = $3 \
         WHERE projection = $4 AND position = $5",
    )
    .bind(to_i64(position))
    .bind(event_time_ms)
    .bind(now_ms)
    .bind(key)
    .bind(to_i64(expected))
    .execute(ex)
    .await?;
    Ok(moved.rows_affected() == 1)
}

/// Takes the lock a runner's batch takes (the checkpoint row in PostgreSQL,
/// the write lock in SQLite): until `tx` ends, the checkpoint cannot move
/// and the runner applies nothing.
pub(crate) async fn lock_checkpoint(
    tx: &mut sqlx::Transaction<'_, Any>,
    key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE sluice_checkpoints SET updated_at_ms = $1 WHERE projection = $2")
        .bind(unix_ms(OffsetDateTime::now_utc()))
        .bind(key)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Moves `key`'s checkpoint back to `position` (a replay) and clears its halt.
pub(crate) async fn rewind_checkpoint(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
    position: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE sluice_checkpoints SET position = $1, event_time_ms = 0, \
         halted_at_position = NULL, halted_reason = NULL WHERE projection = $2",
    )
    .bind(to_i64(position))
    .bind(key)
    .execute(ex)
    .await?;
    Ok(())
}

/// Sets `key`'s checkpoint to `position` (`event_time_ms` of its event) and
/// clears its halt: a reset (to 0) or a rebuild going live.
pub(crate) async fn set_checkpoint(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
    position: i64,
    event_time_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE sluice_checkpoints SET position = $1, event_time_ms = $2, updated_at_ms = $3, \
         halted_at_position = NULL, halted_reason = NULL WHERE projection = $4",
    )
    .bind(position)
    .bind(event_time_ms)
    .bind(unix_ms(OffsetDateTime::now_utc()))
    .bind(key)
    .execute(ex)
    .await?;
    Ok(())
}

/// Deletes `key`'s checkpoint row.
pub(crate) async fn delete_checkpoint(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM sluice_checkpoints WHERE projection = $1")
        .bind(key)
        .execute(ex)
        .await?;
    Ok(())
}

// ---- parked aggregates and dead letters, per key ----

/// The parking tables, in the order every writer of both touches them.
const PER_KEY_TABLES: [&str; 2] = ["sluice_parked", "sluice_dead_letters"];

/// Forgets `key`'s parked aggregates and dead-letter records.
pub(crate) async fn forget_records(conn: &mut AnyConnection, key: &str) -> Result<(), sqlx::Error> {
    for t in PER_KEY_TABLES {
        sqlx::query(&format!("DELETE FROM {t} WHERE projection = $1"))
            .bind(key)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Replaces `to`'s parked aggregates and dead-letter records with `from`'s
/// (a rebuild's copies going live).
pub(crate) async fn move_records(
    conn: &mut AnyConnection,
    from: &str,
    to: &str,
) -> Result<(), sqlx::Error> {
    for t in PER_KEY_TABLES {
        sqlx::query(&format!("DELETE FROM {t} WHERE projection = $1"))
            .bind(to)
            .execute(&mut *conn)
            .await?;
        sqlx::query(&format!(
            "UPDATE {t} SET projection = $1 WHERE projection = $2"
        ))
        .bind(to)
        .bind(from)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Forgets `key`'s dead-letter records at `from` or later and the parking
/// behind them (a replay decides about those events again); returns how
/// many records went.
pub(crate) async fn forget_records_from(
    conn: &mut AnyConnection,
    key: &str,
    from: u64,
) -> Result<u64, sqlx::Error> {
    let cleared =
        sqlx::query("DELETE FROM sluice_dead_letters WHERE projection = $1 AND position >= $2")
            .bind(key)
            .bind(to_i64(from))
            .execute(&mut *conn)
            .await?
            .rows_affected();
    sqlx::query("DELETE FROM sluice_parked WHERE projection = $1 AND behind_position >= $2")
        .bind(key)
        .bind(to_i64(from))
        .execute(&mut *conn)
        .await?;
    Ok(cleared)
}

/// `(dead letters, parked aggregates)` of `key`.
pub(crate) async fn record_counts(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
) -> Result<(u64, u64), sqlx::Error> {
    let counts = sqlx::query(
        "SELECT (SELECT COUNT(*) FROM sluice_dead_letters WHERE projection = $1), \
                (SELECT COUNT(*) FROM sluice_parked WHERE projection = $1)",
    )
    .bind(key)
    .fetch_one(ex)
    .await?;
    Ok((to_u64(counts.try_get(0)?), to_u64(counts.try_get(1)?)))
}

// ---- parked aggregates ----

/// `key`'s parked aggregates: stream -> the position of their head.
pub(crate) async fn parked(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
) -> Result<HashMap<String, u64>, sqlx::Error> {
    let rows =
        sqlx::query("SELECT stream, behind_position FROM sluice_parked WHERE projection = $1")
            .bind(key)
            .fetch_all(ex)
            .await?;
    let mut parked = HashMap::with_capacity(rows.len());
    for row in rows {
        parked.insert(row.try_get(0)?, to_u64(row.try_get(1)?));
    }
    Ok(parked)
}

/// `key`'s parked aggregates, oldest head first.
pub(crate) async fn parked_streams(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query("SELECT stream FROM sluice_parked WHERE projection = $1 ORDER BY behind_position")
        .bind(key)
        .fetch_all(ex)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect()
}

/// The head position `stream` is parked behind for `key`, if it is parked.
pub(crate) async fn parked_head(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
    stream: &str,
) -> Result<Option<u64>, sqlx::Error> {
    sqlx::query("SELECT behind_position FROM sluice_parked WHERE projection = $1 AND stream = $2")
        .bind(key)
        .bind(stream)
        .fetch_optional(ex)
        .await?
        .map(|r| r.try_get::<i64, _>(0).map(to_u64))
        .transpose()
}

/// Parks `stream` for `key` behind `head`, unless it is parked already.
pub(crate) async fn park(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
    stream: &str,
    head: u64,
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO sluice_parked (projection, stream, behind_position, parked_at_ms) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (projection, stream) DO NOTHING",
    )
    .bind(key)
    .bind(stream)
    .bind(to_i64(head))
    .bind(now_ms)
    .execute(ex)
    .await?;
    Ok(())
}

/// Parks `stream` (parked already) behind a new `head`.
pub(crate) async fn move_park_head(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
    stream: &str,
    head: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE sluice_parked SET behind_position = $1 WHERE projection = $2 AND stream = $3",
    )
    .bind(to_i64(head))
    .bind(key)
    .bind(stream)
    .execute(ex)
    .await?;
    Ok(())
}

/// Releases `stream` for `key`: its later events apply again.
pub(crate) async fn release(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
    stream: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM sluice_parked WHERE projection = $1 AND stream = $2")
        .bind(key)
        .bind(stream)
        .execute(ex)
        .await?;
    Ok(())
}

// ---- dead letters ----

/// One event a projection did not apply (its SQL record; the `DLQ` stream
/// holds the original).
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterRecord {
    /// Its stream sequence.
    pub position: u64,
    /// Its aggregate (`<category>.<id>`, or the subject when that is invalid).
    pub stream: String,
    /// `decode`, `handler` or `parked`.
    pub kind: String,
    /// Why it was not applied.
    pub reason: String,
    /// When (Unix ms).
    pub failed_at_ms: i64,
}

/// The dead letters of `projection`, oldest position first.
pub async fn dead_letters(db: &Database, projection: &str) -> Result<Vec<DeadLetterRecord>, Error> {
    let rows = sqlx::query(
        "SELECT position, stream, kind, reason, failed_at_ms FROM sluice_dead_letters \
         WHERE projection = $1 ORDER BY position",
    )
    .bind(projection)
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(DeadLetterRecord {
                position: to_u64(r.try_get(0)?),
                stream: r.try_get(1)?,
                kind: r.try_get(2)?,
                reason: r.try_get(3)?,
                failed_at_ms: r.try_get(4)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Error::from)
}

/// Records that `key` did not apply the event at `position` of `stream`
/// (once: a record already there stays).
pub(crate) async fn record_dead_letter(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
    position: u64,
    stream: &str,
    kind: DeadLetterKind,
    reason: &str,
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO sluice_dead_letters \
         (projection, position, stream, kind, reason, failed_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (projection, position) DO NOTHING",
    )
    .bind(key)
    .bind(to_i64(position))
    .bind(stream)
    .bind(kind.as_str())
    .bind(reason)
    .bind(now_ms)
    .execute(ex)
    .await?;
    Ok(())
}

/// Whether `key` has a dead-letter record at `position`.
pub(crate) async fn has_dead_letter(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
    position: u64,
) -> Result<bool, sqlx::Error> {
    Ok(
        sqlx::query("SELECT 1 FROM sluice_dead_letters WHERE projection = $1 AND position = $2")
            .bind(key)
            .bind(to_i64(position))
            .fetch_optional(ex)
            .await?
            .is_some(),
    )
}

/// The aggregate of `key`'s dead letter at `position`, if there is one.
pub(crate) async fn dead_letter_stream(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
    position: u64,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query("SELECT stream FROM sluice_dead_letters WHERE projection = $1 AND position = $2")
        .bind(key)
        .bind(to_i64(position))
        .fetch_optional(ex)
        .await?
        .map(|r| r.try_get(0))
        .transpose()
}

/// The aggregate of `key`'s dead letter at `position` and the head its
/// aggregate is parked behind (if it still is); `None` without a record.
pub(crate) async fn dead_letter_parking(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
    position: u64,
) -> Result<Option<(String, Option<u64>)>, sqlx::Error> {
    sqlx::query(
        "SELECT d.stream, p.behind_position FROM sluice_dead_letters d \
         LEFT JOIN sluice_parked p ON p.projection = d.projection AND p.stream = d.stream \
         WHERE d.projection = $1 AND d.position = $2",
    )
    .bind(key)
    .bind(to_i64(position))
    .fetch_optional(ex)
    .await?
    .map(|r| Ok((r.try_get(0)?, r.try_get::<Option<i64>, _>(1)?.map(to_u64))))
    .transpose()
}

/// `(stream, position)` of `key`'s dead letters whose aggregate is parked,
/// in position order (rows that cannot be read are left out).
pub(crate) async fn parked_dead_letters(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
) -> Result<Vec<(String, u64)>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT d.stream, d.position FROM sluice_dead_letters d \
         JOIN sluice_parked p ON p.projection = d.projection AND p.stream = d.stream \
         WHERE d.projection = $1 ORDER BY d.position",
    )
    .bind(key)
    .fetch_all(ex)
    .await?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let stream = row.try_get::<String, _>(0).ok()?;
            let position = row.try_get::<i64, _>(1).ok()?;
            Some((stream, to_u64(position)))
        })
        .collect())
}

/// Positions of `key`'s dead letters of `stream`, in order.
pub(crate) async fn dead_letter_positions(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
    stream: &str,
) -> Result<Vec<u64>, sqlx::Error> {
    sqlx::query(
        "SELECT position FROM sluice_dead_letters WHERE projection = $1 AND stream = $2 \
         ORDER BY position",
    )
    .bind(key)
    .bind(stream)
    .fetch_all(ex)
    .await?
    .iter()
    .map(|r| r.try_get::<i64, _>(0).map(to_u64))
    .collect()
}

/// The first position of `key`'s dead letters of `stream`, if any is left.
pub(crate) async fn first_dead_letter(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
    stream: &str,
) -> Result<Option<u64>, sqlx::Error> {
    let first: Option<i64> = sqlx::query(
        "SELECT MIN(position) FROM sluice_dead_letters WHERE projection = $1 AND stream = $2",
    )
    .bind(key)
    .bind(stream)
    .fetch_one(ex)
    .await?
    .try_get(0)?;
    Ok(first.map(to_u64))
}

/// Positions of `key`'s dead letters before `position`.
pub(crate) async fn dead_letters_before(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
    position: u64,
) -> Result<HashSet<u64>, sqlx::Error> {
    sqlx::query("SELECT position FROM sluice_dead_letters WHERE projection = $1 AND position < $2")
        .bind(key)
        .bind(to_i64(position))
        .fetch_all(ex)
        .await?
        .iter()
        .map(|r| r.try_get::<i64, _>(0).map(to_u64))
        .collect()
}

/// Drops `key`'s dead-letter record at `position`.
pub(crate) async fn delete_dead_letter(
    ex: impl Executor<'_, Database = Any>,
    key: &str,
    position: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM sluice_dead_letters WHERE projection = $1 AND position = $2")
        .bind(key)
        .bind(to_i64(position))
        .execute(ex)
        .await?;
    Ok(())
}

/// `stream` stays parked for `key`, now behind `head` (rejected again with
/// `kind` and `reason`): its head record says so, and the records after it
/// are parked behind it.
pub(crate) async fn repark(
    conn: &mut AnyConnection,
    key: &str,
    stream: &str,
    head: u64,
    kind: DeadLetterKind,
    reason: &str,
) -> Result<(), sqlx::Error> {
    move_park_head(&mut *conn, key, stream, head).await?;
    let behind = parked_reason(head);
    sqlx::query(
        "UPDATE sluice_dead_letters SET kind = CASE WHEN position = $1 THEN $2 ELSE $3 END, \
         reason = CASE WHEN position = $1 THEN $4 ELSE $5 END \
         WHERE projection = $6 AND stream = $7",
    )
    .bind(to_i64(head))
    .bind(kind.as_str())
    .bind(DeadLetterKind::Parked.as_str())
    .bind(reason)
    .bind(behind.as_str())
    .bind(key)
    .bind(stream)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Drops `key`'s record of the dead letter at `position` and moves the
/// parking of its aggregate to the next dead letter of it, or releases the
/// aggregate when none is left (the caller holds the checkpoint lock).
pub(crate) async fn forget_dead_letter(
    conn: &mut AnyConnection,
    key: &str,
    position: u64,
) -> Result<(), sqlx::Error> {
    let Some(stream) = dead_letter_stream(&mut *conn, key, position).await? else {
        return Ok(());
    };
    delete_dead_letter(&mut *conn, key, position).await?;
    if parked_head(&mut *conn, key, &stream).await? == Some(position) {
        match first_dead_letter(&mut *conn, key, &stream).await? {
            Some(next) => move_park_head(&mut *conn, key, &stream, next).await?,
            None => release(&mut *conn, key, &stream).await?,
        }
    }
    Ok(())
}
