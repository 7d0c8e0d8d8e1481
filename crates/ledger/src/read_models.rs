//! The ledger's projections: `account_balances` and `account_activity`,
//! written set-based over a batch (one multi-row upsert per chunk).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use sluice_events::StreamId;
use sluice_projections::{
    Column, KeyedReadModel, KeyedTable, ProjectedEvent, Projection, Rejection, RewindSupport,
    Tables,
};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::events::{ACCOUNT_CATEGORY, AccountEvent};
use crate::fold::{AccountRow, FoldInput, fold_balances};

/// Name (and checkpoint key) of the balances projection. Constant: renaming
/// it rebuilds the read model from position 1.
pub const ACCOUNT_BALANCES: &str = "account_balances";
/// Name (and checkpoint key) of the activity projection.
pub const ACCOUNT_ACTIVITY: &str = "account_activity";

/// Rows per multi-row statement: 7 columns x 500 stays far below SQLite's
/// and PostgreSQL's bind-parameter limits.
const CHUNK: usize = 500;

/// How `account_balances` writes (row-at-a-time exists only to measure
/// what set-based writing buys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteMode {
    /// One read and one multi-row upsert per chunk of the batch.
    #[default]
    SetBased,
    /// One read and one write per event.
    RowAtATime,
}

/// `account_balances`: one row per account, the fold of its events.
#[derive(Debug, Clone, Copy, Default)]
pub struct AccountBalances {
    mode: WriteMode,
}

impl AccountBalances {
    /// The projection, writing set-based.
    pub fn new() -> Self {
        Self::default()
    }

    /// The projection with a given write mode (for benchmarks).
    pub fn with_mode(mode: WriteMode) -> Self {
        Self { mode }
    }
}

/// `account_activity`: one row per account event.
#[derive(Debug, Clone, Copy, Default)]
pub struct AccountActivity;

/// `($1, $2, ...), (...)` for `rows` x `cols` parameters: numbered in order
/// of appearance, which SQLite and PostgreSQL both bind positionally.
fn values_list(rows: usize, cols: usize) -> String {
    let mut s = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        if r > 0 {
            s.push(',');
        }
        s.push('(');
        for c in 0..cols {
            if c > 0 {
                s.push(',');
            }
            let _ = write!(s, "${}", r * cols + c + 1);
        }
        s.push(')');
    }
    s
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn row_to_account(r: &AnyRow) -> Result<AccountRow, sqlx::Error> {
    Ok(AccountRow {
        id: r.try_get(0)?,
        owner: r.try_get(1)?,
        currency: r.try_get(2)?,
        balance: r.try_get(3)?,
        version: u64::try_from(r.try_get::<i64, _>(4)?).unwrap_or(0),
        status: r.try_get(5)?,
        updated_at: r.try_get(6)?,
    })
}

const BALANCE_COLUMNS: &str = "id, owner, currency, balance, version, status, updated_at";

async fn load_accounts(
    conn: &mut AnyConnection,
    table: &str,
    ids: &[&str],
) -> Result<BTreeMap<String, AccountRow>, sqlx::Error> {
    let mut out = BTreeMap::new();
    for chunk in ids.chunks(CHUNK) {
        let params: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT {BALANCE_COLUMNS} FROM {table} WHERE id IN ({})",
            params.join(",")
        );
        let mut q = sqlx::query(&sql);
        for id in chunk {
            q = q.bind(*id);
        }
        for r in q.fetch_all(&mut *conn).await? {
            let row = row_to_account(&r)?;
            out.insert(row.id.clone(), row);
        }
    }
    Ok(out)
}

async fn upsert_accounts(
    conn: &mut AnyConnection,
    table: &str,
    rows: &[&AccountRow],
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(CHUNK) {
        let sql = format!(
            "INSERT INTO {table} ({BALANCE_COLUMNS}) VALUES {} \
             ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, \
             currency = excluded.currency, balance = excluded.balance, \
             version = excluded.version, status = excluded.status, \
             updated_at = excluded.updated_at",
            values_list(chunk.len(), 7)
        );
        let mut q = sqlx::query(&sql);
        for r in chunk {
            q = q
                .bind(r.id.as_str())
                .bind(r.owner.as_str())
                .bind(r.currency.as_str())
                .bind(r.balance)
                .bind(to_i64(r.version))
                .bind(r.status.as_str())
                .bind(r.updated_at.as_str());
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

impl AccountBalances {
    async fn apply_set_based(
        conn: &mut AnyConnection,
        table: &str,
        events: &[ProjectedEvent],
    ) -> Result<Vec<Rejection>, sqlx::Error> {
        let times: Vec<String> = events.iter().map(ProjectedEvent::time_rfc3339).collect();
        let inputs: Vec<FoldInput<'_>> = events
            .iter()
            .zip(&times)
            .map(|(e, t)| FoldInput {
                position: e.position,
                account: e.stream_id.id(),
                time: t,
                event: AccountEvent::decode(&e.envelope),
            })
            .collect();
        let mut ids: Vec<&str> = inputs.iter().map(|i| i.account).collect();
        ids.sort_unstable();
        ids.dedup();
        let existing = load_accounts(conn, table, &ids).await?;
        let out = fold_balances(&existing, &inputs);
        if !out.rejected.is_empty() {
            return Ok(out
                .rejected
                .into_iter()
                .map(|(p, r)| Rejection::new(p, r))
                .collect());
        }
        let rows: Vec<&AccountRow> = out.changed.values().collect();
        upsert_accounts(conn, table, &rows).await?;
        Ok(Vec::new())
    }

    async fn apply_row_at_a_time(
        conn: &mut AnyConnection,
        table: &str,
        events: &[ProjectedEvent],
    ) -> Result<Vec<Rejection>, sqlx::Error> {
        for e in events {
            let time = e.time_rfc3339();
            let input = FoldInput {
                position: e.position,
                account: e.stream_id.id(),
                time: &time,
                event: AccountEvent::decode(&e.envelope),
            };
            let existing = load_accounts(conn, table, &[input.account]).await?;
            let out = fold_balances(&existing, std::slice::from_ref(&input));
            if let Some((p, r)) = out.rejected.into_iter().next() {
                return Ok(vec![Rejection::new(p, r)]);
            }
            let rows: Vec<&AccountRow> = out.changed.values().collect();
            upsert_accounts(conn, table, &rows).await?;
        }
        Ok(Vec::new())
    }
}

impl Projection for AccountBalances {
    fn name(&self) -> &'static str {
        ACCOUNT_BALANCES
    }

    fn categories(&self) -> &'static [&'static str] {
        &[ACCOUNT_CATEGORY]
    }

    fn tables(&self) -> &'static [&'static str] {
        &[ACCOUNT_BALANCES]
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        tables: &Tables,
        events: &[ProjectedEvent],
    ) -> Result<Vec<Rejection>, sqlx::Error> {
        let table = tables.name(ACCOUNT_BALANCES);
        match self.mode {
            WriteMode::SetBased => Self::apply_set_based(conn, &table, events).await,
            WriteMode::RowAtATime => Self::apply_row_at_a_time(conn, &table, events).await,
        }
    }

    /// A balance is the fold of its account's events alone: forget the
    /// accounts touched from the replay position on, and the runtime folds
    /// their earlier events again.
    fn rewind_support(&self) -> RewindSupport {
        RewindSupport::ByAggregate
    }

    async fn rewind(
        &self,
        conn: &mut AnyConnection,
        tables: &Tables,
        _from: u64,
        aggregates: &[StreamId],
    ) -> Result<(), sqlx::Error> {
        Self::ROWS.delete_aggregates(conn, tables, aggregates).await
    }
}

impl Projection for AccountActivity {
    fn name(&self) -> &'static str {
        ACCOUNT_ACTIVITY
    }

    fn categories(&self) -> &'static [&'static str] {
        &[ACCOUNT_CATEGORY]
    }

    fn tables(&self) -> &'static [&'static str] {
        &[ACCOUNT_ACTIVITY]
    }

    /// Rejects only what is nonsense on its own (unknown type, malformed
    /// data, bad amounts): the activity log has no account state to check.
    async fn apply(
        &self,
        conn: &mut AnyConnection,
        tables: &Tables,
        events: &[ProjectedEvent],
    ) -> Result<Vec<Rejection>, sqlx::Error> {
        let table = tables.name(ACCOUNT_ACTIVITY);
        let mut rows = Vec::with_capacity(events.len());
        let mut rejected = Vec::new();
        for e in events {
            match AccountEvent::decode(&e.envelope) {
                Ok(ev) => rows.push((e, ev.amount(), e.time_rfc3339())),
                Err(reason) => rejected.push(Rejection::new(e.position, reason)),
            }
        }
        if !rejected.is_empty() {
            return Ok(rejected);
        }
        for chunk in rows.chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO {table} (position, account, event_type, amount, time) \
                 VALUES {}",
                values_list(chunk.len(), 5)
            );
            let mut q = sqlx::query(&sql);
            for (e, amount, time) in chunk {
                q = q
                    .bind(to_i64(e.position))
                    .bind(e.stream_id.id())
                    .bind(e.envelope.event_type.as_str())
                    .bind(*amount)
                    .bind(time.as_str());
            }
            q.execute(&mut *conn).await?;
        }
        Ok(Vec::new())
    }

    /// One row per event, keyed by its position.
    fn rewind_support(&self) -> RewindSupport {
        RewindSupport::ByPosition
    }

    async fn rewind(
        &self,
        conn: &mut AnyConnection,
        tables: &Tables,
        from: u64,
        _aggregates: &[StreamId],
    ) -> Result<(), sqlx::Error> {
        let table = tables.name(ACCOUNT_ACTIVITY);
        sqlx::query(&format!("DELETE FROM {table} WHERE position >= $1"))
            .bind(to_i64(from))
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

impl KeyedReadModel for AccountBalances {
    const ROWS: KeyedTable = KeyedTable {
        table: ACCOUNT_BALANCES,
        key: Column::text("id"),
        columns: &[
            Column::text("owner"),
            Column::text("currency"),
            Column::int("balance"),
            Column::int("version"),
            Column::text("status"),
            Column::text("updated_at"),
        ],
        category: Some(ACCOUNT_CATEGORY),
    };
}

impl KeyedReadModel for AccountActivity {
    const ROWS: KeyedTable = KeyedTable {
        table: ACCOUNT_ACTIVITY,
        key: Column::int("position"),
        columns: &[
            Column::text("account"),
            Column::text("event_type").as_field("type"),
            Column::optional_int("amount"),
            Column::text("time"),
        ],
        category: None,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_in_order_of_appearance() {
        assert_eq!(values_list(2, 3), "($1,$2,$3),($4,$5,$6)");
    }
}
