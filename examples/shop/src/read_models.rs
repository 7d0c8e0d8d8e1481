//! The shop's read models on the projection runtime (each event takes
//! effect exactly once):
//! - `stock_levels`: one row per SKU (available, reserved, sold), the sum
//!   of its events' deltas, folded per batch;
//! - `orders`: one row per order saga (customer, lines, state, reason),
//!   moved by [`order_transition`].
//!
//! Rows are per aggregate, so both replay by aggregate.

use std::collections::BTreeMap;

use sluice_events::StreamId;
use sluice_projections::{
    Column, KeyedReadModel, KeyedTable, ProjectedEvent, Projection, Rejection, RewindSupport,
    RowChange, StateRows, Tables,
};
use sluice_sagas::{Observed, observe};
use sqlx::AnyConnection;

use crate::order::{CANCELLED, CONFIRMED, Order, PLACED, order_transition};
use crate::stock::{STOCK_CATEGORY, StockEvent};

/// Name (checkpoint key and table) of the stock levels projection.
pub const STOCK_LEVELS: &str = "stock_levels";
/// Name (checkpoint key and table) of the orders projection.
pub const ORDERS: &str = "orders";
/// The saga stream category `orders` reads (`saga-` + the saga's name).
const ORDER_STREAMS: &str = "saga-order";

/// One SKU's row change over a batch: deltas of (available, reserved,
/// sold), and the position and time of its last event.
type LevelDelta = ((i64, i64, i64), u64, String);

/// Sums `(sku, position, time, event)` (log order) into one delta per SKU.
/// Pure: the counts are sums, so any batching gives the same rows.
fn level_deltas<'a>(
    events: impl IntoIterator<Item = (&'a str, u64, String, StockEvent)>,
) -> BTreeMap<&'a str, LevelDelta> {
    let mut out: BTreeMap<&str, LevelDelta> = BTreeMap::new();
    for (sku, position, time, event) in events {
        let ((a, r, s), version, at) = out.entry(sku).or_default();
        let (da, dr, ds) = event.deltas();
        (*a, *r, *s) = (
            a.saturating_add(da),
            r.saturating_add(dr),
            s.saturating_add(ds),
        );
        (*version, *at) = (position, time);
    }
    out
}

/// `stock_levels`: one row per SKU.
#[derive(Debug, Clone, Copy, Default)]
pub struct StockLevels;

impl Projection for StockLevels {
    fn name(&self) -> &'static str {
        STOCK_LEVELS
    }

    fn categories(&self) -> &'static [&'static str] {
        &[STOCK_CATEGORY]
    }

    fn tables(&self) -> &'static [&'static str] {
        &[STOCK_LEVELS]
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        tables: &Tables,
        events: &[ProjectedEvent],
    ) -> Result<Vec<Rejection>, sqlx::Error> {
        let (mut decoded, mut rejected) = (Vec::with_capacity(events.len()), Vec::new());
        for e in events {
            match StockEvent::decode(&e.envelope.event_type, &e.envelope.data) {
                Ok(ev) => decoded.push((e.stream_id.id(), e.position, e.time_rfc3339(), ev)),
                Err(reason) => rejected.push(Rejection::new(e.position, reason)),
            }
        }
        if !rejected.is_empty() {
            return Ok(rejected);
        }
        let t = tables.name(STOCK_LEVELS);
        let sql = format!(
            "INSERT INTO {t} (sku, available, reserved, sold, version, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (sku) DO UPDATE SET \
             available = {t}.available + excluded.available, \
             reserved = {t}.reserved + excluded.reserved, sold = {t}.sold + excluded.sold, \
             version = excluded.version, updated_at = excluded.updated_at"
        );
        for (sku, ((available, reserved, sold), version, at)) in level_deltas(decoded) {
            sqlx::query(&sql)
                .bind(sku)
                .bind(available)
                .bind(reserved)
                .bind(sold)
                .bind(i64::try_from(version).unwrap_or(i64::MAX))
                .bind(at)
                .execute(&mut *conn)
                .await?;
        }
        Ok(Vec::new())
    }

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

impl KeyedReadModel for StockLevels {
    /// `{sku, available, reserved, sold, version, updated_at}`.
    const ROWS: KeyedTable = KeyedTable {
        table: STOCK_LEVELS,
        key: Column::text("sku"),
        columns: &[
            Column::int("available"),
            Column::int("reserved"),
            Column::int("sold"),
            Column::int("version"),
            Column::text("updated_at"),
        ],
        category: Some(STOCK_CATEGORY),
    };
}

/// `orders`: one row per order saga.
#[derive(Debug, Clone, Copy, Default)]
pub struct Orders;

/// A confirmed or cancelled order stays so (`react` ignores whatever
/// arrives after an end).
static ORDER_WRITES: StateRows = StateRows {
    table: ORDERS,
    key: "id",
    data: &["customer", "lines"],
    created_at: "placed_at",
    initial: PLACED,
    finals: &[CONFIRMED, CANCELLED],
};

fn order_change(e: &ProjectedEvent) -> Result<RowChange, String> {
    Ok(match observe::<Order>(&e.envelope, "order")? {
        Observed::Started(o) => {
            let lines = serde_json::to_string(&o.lines).unwrap_or_default();
            RowChange::Insert(vec![o.customer.into(), lines.into()])
        }
        // Most saga events change nothing here.
        Observed::Transition(event) => match order_transition(&event) {
            (None, None) => RowChange::Unchanged,
            (state, reason) => RowChange::Update(state, reason),
        },
    })
}

impl Projection for Orders {
    fn name(&self) -> &'static str {
        ORDERS
    }

    fn categories(&self) -> &'static [&'static str] {
        &[ORDER_STREAMS]
    }

    fn tables(&self) -> &'static [&'static str] {
        &[ORDERS]
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        tables: &Tables,
        events: &[ProjectedEvent],
    ) -> Result<Vec<Rejection>, sqlx::Error> {
        ORDER_WRITES.apply(conn, tables, events, order_change).await
    }

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

impl KeyedReadModel for Orders {
    /// `{id, customer, lines, state, reason, placed_at, updated_at, version}`.
    const ROWS: KeyedTable = KeyedTable {
        table: ORDERS,
        key: Column::text("id"),
        columns: &[
            Column::text("customer"),
            Column::json("lines"),
            Column::text("state"),
            Column::optional_text("reason"),
            Column::text("placed_at"),
            Column::text("updated_at"),
            Column::int("version"),
        ],
        category: Some(ORDER_STREAMS),
    };
}

// The category is `saga-` + the saga's name; keep them in step.
const _: () = {
    let (a, p, n) = (
        ORDER_STREAMS.as_bytes(),
        b"saga-",
        crate::ORDER_SAGA.as_bytes(),
    );
    assert!(a.len() == p.len() + n.len());
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_sums_of_deltas_whatever_the_batches() {
        let order = || "o-1".to_owned();
        let events = [
            ("apple", 1, StockEvent::Received { quantity: 5 }),
            ("pear", 2, StockEvent::Received { quantity: 1 }),
            (
                "apple",
                3,
                StockEvent::Reserved {
                    order: order(),
                    quantity: 4,
                },
            ),
            (
                "apple",
                4,
                StockEvent::Released {
                    order: order(),
                    quantity: 1,
                },
            ),
            (
                "apple",
                5,
                StockEvent::Sold {
                    order: order(),
                    quantity: 3,
                },
            ),
        ];
        let input = |range: std::ops::Range<usize>| {
            events[range]
                .iter()
                .map(|(s, p, e)| (*s, *p, format!("t{p}"), e.clone()))
                .collect::<Vec<_>>()
        };
        let all = level_deltas(input(0..5));
        assert_eq!(all["apple"], ((2, 0, 3), 5, "t5".to_owned()));
        assert_eq!(all["pear"].0, (1, 0, 0));
        // Two batches add up to the same counts.
        let (a, b) = (level_deltas(input(0..3)), level_deltas(input(3..5)));
        let (x, y) = (a["apple"].0, b["apple"].0);
        assert_eq!((x.0 + y.0, x.1 + y.1, x.2 + y.2), (2, 0, 3));
    }
}
