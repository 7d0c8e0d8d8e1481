//! The stock of one SKU (`events.stock.<sku>`): its events, their schemas,
//! and the aggregate deciding receive / reserve / release / sell.
//!
//! Reservations are held per order, so a release or a sale takes back
//! exactly what that order set aside and never another order's units.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sluice_events::{Aggregate, Catalog, Envelope, NewEvent, validate_token};

/// The aggregate category of stock (one stream per SKU).
pub const STOCK_CATEGORY: &str = "stock";
/// `shop.stock.received.v1` `{ "quantity": integer > 0 }`.
pub const RECEIVED: &str = "shop.stock.received.v1";
/// `shop.stock.reserved.v1` `{ "order": id, "quantity": integer > 0 }`.
pub const RESERVED: &str = "shop.stock.reserved.v1";
/// `shop.stock.released.v1` `{ "order": id, "quantity": integer > 0 }`.
pub const RELEASED: &str = "shop.stock.released.v1";
/// `shop.stock.sold.v1` `{ "order": id, "quantity": integer > 0 }`.
pub const SOLD: &str = "shop.stock.sold.v1";

/// The JSON Schemas (`examples/shop/schemas/<type>.json`), by wire name.
const SCHEMAS: [(&str, &str); 4] = [
    (
        RECEIVED,
        include_str!("../schemas/shop.stock.received.v1.json"),
    ),
    (
        RESERVED,
        include_str!("../schemas/shop.stock.reserved.v1.json"),
    ),
    (
        RELEASED,
        include_str!("../schemas/shop.stock.released.v1.json"),
    ),
    (SOLD, include_str!("../schemas/shop.stock.sold.v1.json")),
];

/// What the shop writes, for the public append's checks: the `stock`
/// category with every `shop.stock.*` type and its schema (compiled here:
/// build it once at start-up).
pub fn catalog() -> Result<Catalog, sluice_events::Error> {
    SCHEMAS.iter().try_fold(Catalog::new(), |c, (t, schema)| {
        c.declare(STOCK_CATEGORY, t, schema)
    })
}

/// A stock event, decoded and validated on its own (without state).
/// Quantities are units, > 0; `order` is the order (saga) id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StockEvent {
    Received { quantity: i64 },
    Reserved { order: String, quantity: i64 },
    Released { order: String, quantity: i64 },
    Sold { order: String, quantity: i64 },
}

/// The data of every stock event (`order` on all but `received`).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Data {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    order: Option<String>,
    quantity: i64,
}

impl StockEvent {
    fn parts(&self) -> (&'static str, Option<&String>, i64) {
        match self {
            Self::Received { quantity } => (RECEIVED, None, *quantity),
            Self::Reserved { order, quantity } => (RESERVED, Some(order), *quantity),
            Self::Released { order, quantity } => (RELEASED, Some(order), *quantity),
            Self::Sold { order, quantity } => (SOLD, Some(order), *quantity),
        }
    }

    /// What the event does to (available, reserved, sold).
    pub(crate) fn deltas(&self) -> (i64, i64, i64) {
        match *self {
            Self::Received { quantity } => (quantity, 0, 0),
            Self::Reserved { quantity, .. } => (-quantity, quantity, 0),
            Self::Released { quantity, .. } => (quantity, -quantity, 0),
            Self::Sold { quantity, .. } => (0, -quantity, quantity),
        }
    }

    /// Decodes a type and JSON data; the error is the dead-letter reason.
    pub(crate) fn decode(event_type: &str, data: &[u8]) -> Result<Self, String> {
        let d: Data = serde_json::from_slice(data).map_err(|e| {
            let t: String = event_type.chars().take(64).collect();
            format!("malformed {t:?} data: {e}")
        })?;
        if d.quantity <= 0 {
            return Err(format!("quantity must be > 0, got {}", d.quantity));
        }
        if let Some(o) = &d.order {
            validate_token("order id", o).map_err(|e| e.to_string())?;
        }
        let quantity = d.quantity;
        match (event_type, d.order) {
            (RECEIVED, None) => Ok(Self::Received { quantity }),
            (RESERVED, Some(order)) => Ok(Self::Reserved { order, quantity }),
            (RELEASED, Some(order)) => Ok(Self::Released { order, quantity }),
            (SOLD, Some(order)) => Ok(Self::Sold { order, quantity }),
            (RECEIVED, Some(_)) => Err(format!("{RECEIVED} takes no order")),
            (RESERVED | RELEASED | SOLD, None) => Err(format!("{event_type} needs an order")),
            (other, _) => Err(format!(
                "unknown event type {:?} for stock",
                other.chars().take(64).collect::<String>()
            )),
        }
    }
}

/// The stock of one SKU, folded from its events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Stock {
    /// Units free to reserve.
    pub(crate) available: i64,
    /// Units held, per order.
    held: BTreeMap<String, i64>,
    /// Units sold.
    pub(crate) sold: i64,
}

impl Stock {
    /// Units held by orders.
    pub(crate) fn reserved(&self) -> i64 {
        self.held.values().sum()
    }
}

/// What may be asked of a SKU's stock. Reserving, releasing or selling 0
/// units does nothing (the order saga's unused line steps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StockCommand {
    Receive {
        quantity: i64,
    },
    /// `sku` is only for the refusal's message.
    Reserve {
        sku: String,
        order: String,
        quantity: i64,
    },
    Release {
        order: String,
        quantity: i64,
    },
    Sell {
        order: String,
        quantity: i64,
    },
}

/// Why the stock refused a command; every variant is permanent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StockRejection {
    /// A negative quantity, or receiving zero.
    #[error("quantity must be a positive integer, got {0}")]
    InvalidQuantity(i64),
    /// Fewer units free than asked: (sku, available, asked).
    #[error("insufficient stock for sku {0}: available {1}, asked {2}")]
    InsufficientStock(String, i64, i64),
    /// The order holds fewer units than it asks to release or sell:
    /// (order, held, asked).
    #[error("order {0} holds {1} units, not {2}")]
    NotReserved(String, i64, i64),
    /// The stock would not fit in 64 bits.
    #[error("stock would overflow")]
    Overflow,
}

impl StockRejection {
    /// A stable name of the rule (the HTTP problem's `rule`).
    pub fn rule(&self) -> &'static str {
        match self {
            Self::InvalidQuantity(_) => "quantity-must-be-positive",
            Self::InsufficientStock(..) => "sufficient-stock",
            Self::NotReserved(..) => "reserved-by-order",
            Self::Overflow => "stock-in-range",
        }
    }
}

impl Aggregate for Stock {
    const CATEGORY: &'static str = STOCK_CATEGORY;
    type Command = StockCommand;
    type Event = StockEvent;
    type Rejection = StockRejection;

    fn decide(&self, command: &StockCommand) -> Result<Vec<StockEvent>, StockRejection> {
        use StockCommand as C;
        let (order, quantity) = match command {
            C::Receive { quantity } if *quantity <= 0 => {
                return Err(StockRejection::InvalidQuantity(*quantity));
            }
            C::Receive { quantity } => {
                let quantity = *quantity;
                self.available
                    .checked_add(quantity)
                    .ok_or(StockRejection::Overflow)?;
                return Ok(vec![StockEvent::Received { quantity }]);
            }
            C::Reserve {
                order, quantity, ..
            }
            | C::Release { order, quantity }
            | C::Sell { order, quantity } => (order.clone(), *quantity),
        };
        if quantity <= 0 {
            return match quantity {
                0 => Ok(vec![]),
                _ => Err(StockRejection::InvalidQuantity(quantity)),
            };
        }
        let held = self.held.get(&order).copied().unwrap_or(0);
        match command {
            C::Reserve { sku, .. } if self.available < quantity => Err(
                StockRejection::InsufficientStock(sku.clone(), self.available, quantity),
            ),
            C::Reserve { .. } => Ok(vec![StockEvent::Reserved { order, quantity }]),
            _ if held < quantity => Err(StockRejection::NotReserved(order, held, quantity)),
            C::Release { .. } => Ok(vec![StockEvent::Released { order, quantity }]),
            _ => Ok(vec![StockEvent::Sold { order, quantity }]),
        }
    }

    fn evolve(mut self, event: &StockEvent) -> Self {
        // Events were decided against this state, so they fit; saturating
        // arithmetic keeps a hand-written log from panicking.
        let (free, hold, sold) = event.deltas();
        self.available = self.available.saturating_add(free);
        self.sold = self.sold.saturating_add(sold);
        if let (_, Some(order), _) = event.parts() {
            let held = self.held.entry(order.clone()).or_default();
            *held = held.saturating_add(hold);
            if *held <= 0 {
                self.held.remove(order);
            }
        }
        self
    }

    fn encode(event: &StockEvent) -> Result<NewEvent, sluice_events::Error> {
        let (event_type, order, quantity) = event.parts();
        let data = Data {
            order: order.cloned(),
            quantity,
        };
        let body = serde_json::to_vec(&data)
            .map_err(|e| sluice_events::Error::InvalidData(e.to_string()))?;
        Ok(NewEvent::new(event_type, body).with_source("urn:sluice:shop"))
    }

    fn decode(envelope: &Envelope) -> Result<StockEvent, sluice_events::Error> {
        StockEvent::decode(&envelope.event_type, &envelope.data)
            .map_err(sluice_events::Error::InvalidData)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_testkit::given;

    fn received(quantity: i64) -> StockEvent {
        StockEvent::Received { quantity }
    }

    fn reserve(order: &str, quantity: i64) -> StockCommand {
        StockCommand::Reserve {
            sku: "apple".into(),
            order: order.into(),
            quantity,
        }
    }

    fn reserved(order: &str, quantity: i64) -> StockEvent {
        StockEvent::Reserved {
            order: order.into(),
            quantity,
        }
    }

    #[test]
    fn wire_names_are_pinned() {
        // Renaming one breaks stored history.
        assert_eq!(RECEIVED, "shop.stock.received.v1");
        assert_eq!(RESERVED, "shop.stock.reserved.v1");
        assert_eq!(RELEASED, "shop.stock.released.v1");
        assert_eq!(SOLD, "shop.stock.sold.v1");
    }

    #[test]
    fn receiving_needs_a_positive_quantity() {
        given::<Stock>([]).when_then(StockCommand::Receive { quantity: 5 }, vec![received(5)]);
        for q in [0, -3] {
            assert_eq!(
                given::<Stock>([]).when_rejected(StockCommand::Receive { quantity: q }),
                StockRejection::InvalidQuantity(q)
            );
        }
        assert_eq!(
            given::<Stock>([received(i64::MAX)])
                .when_rejected(StockCommand::Receive { quantity: 1 }),
            StockRejection::Overflow
        );
    }

    #[test]
    fn reservations_never_exceed_what_is_available() {
        let g = given::<Stock>([received(5), reserved("o-1", 2), reserved("o-2", 2)]);
        assert_eq!((g.state().available, g.state().reserved()), (1, 4));
        assert_eq!(
            g.when_rejected(reserve("o-3", 4)).to_string(),
            "insufficient stock for sku apple: available 1, asked 4"
        );
        g.when_then(reserve("o-3", 1), vec![reserved("o-3", 1)]);
        // Zero is the saga's unused line: nothing happens.
        g.when_then(reserve("o-3", 0), vec![]);
    }

    #[test]
    fn releases_and_sales_take_only_what_the_order_holds() {
        let g = given::<Stock>([received(5), reserved("o-1", 2)]);
        let release = |q| StockCommand::Release {
            order: "o-1".into(),
            quantity: q,
        };
        let sell = |order: &str, q| StockCommand::Sell {
            order: order.into(),
            quantity: q,
        };
        g.when_then(
            release(2),
            vec![StockEvent::Released {
                order: "o-1".into(),
                quantity: 2,
            }],
        );
        assert!(matches!(
            g.when_rejected(release(3)),
            StockRejection::NotReserved(_, 2, 3)
        ));
        assert!(matches!(
            g.when_rejected(sell("o-2", 1)),
            StockRejection::NotReserved(_, 0, _)
        ));
        let sold = given::<Stock>([
            received(5),
            reserved("o-1", 2),
            StockEvent::Sold {
                order: "o-1".into(),
                quantity: 2,
            },
        ]);
        let s = sold.state();
        assert_eq!((s.available, s.reserved(), s.sold), (3, 0, 2));
        // A sold reservation cannot be released any more.
        assert!(matches!(
            sold.when_rejected(release(2)),
            StockRejection::NotReserved(_, 0, _)
        ));
    }

    #[test]
    fn the_schemas_accept_what_the_shop_writes_and_refuse_bad_receipts() {
        let catalog = catalog().unwrap();
        let stream = sluice_events::StreamId::new(STOCK_CATEGORY, "apple").unwrap();
        let check =
            |t: &str, d: &str| catalog.check(&stream, 0, &NewEvent::new(t, d.as_bytes().to_vec()));
        for e in [
            received(5),
            reserved("o-1", i64::MAX),
            StockEvent::Released {
                order: "o-1".into(),
                quantity: 1,
            },
            StockEvent::Sold {
                order: "o_2-x".into(),
                quantity: 3,
            },
        ] {
            let n = Stock::encode(&e).unwrap();
            check(&n.event_type, std::str::from_utf8(&n.data).unwrap()).unwrap();
            assert_eq!(StockEvent::decode(&n.event_type, &n.data), Ok(e));
        }
        for (t, d) in [
            (RECEIVED, r#"{"quantity": 0}"#),
            (RECEIVED, r#"{"quantity": -2}"#),
            (RECEIVED, r#"{}"#),
            (RECEIVED, r#"{"quantity": 1.5}"#),
            (RECEIVED, r#"{"quantity": "3"}"#),
            (RECEIVED, r#"{"quantity": 1, "order": "o-1"}"#),
            (RESERVED, r#"{"quantity": 1}"#),
            (RESERVED, r#"{"order": "a.b", "quantity": 1}"#),
            (SOLD, r#"[1]"#),
            ("shop.stock.stolen.v1", r#"{"quantity": 1}"#),
        ] {
            // Whatever the decoder cannot read, the schema refuses first.
            assert!(StockEvent::decode(t, d.as_bytes()).is_err(), "{t} {d}");
            let err = check(t, d).expect_err(d);
            assert!(err.is_refused_by_catalog(), "{t} {d}: {err}");
        }
    }
}
