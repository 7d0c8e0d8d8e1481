//! The order saga: reserve every line on its SKU's stock, then sell the
//! reservations; when a line cannot be reserved (or a step times out), the
//! reservations made so far are released and the order ends cancelled.
//!
//! The saga runtime runs a fixed list of steps, each one command to one
//! aggregate, so an order has [`MAX_LINES`] reserve steps (each compensated
//! by a release) and as many sell steps; the steps past an order's last
//! line ask for 0 units, which the stock does nothing for.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sluice_events::{EventStore, validate_token};
use sluice_sagas::{
    Command, CommandKind, Definition, OrchestratorConfig, Outcome, SagaError, SagaEvent,
    command_target, run_command_handler, run_orchestrator,
};
use sluice_workers::WorkerConfig;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::stock::{STOCK_CATEGORY, Stock, StockCommand};

/// The saga's name: instances live on `events.saga-order.<order-id>`.
pub const ORDER_SAGA: &str = "order";
/// Durable worker of the order orchestrator (never rename).
pub const ORDER_ORCHESTRATOR: &str = "shop-order-saga";
/// Durable worker of the stock command handler (never rename).
pub const STOCK_COMMANDS: &str = "shop-stock-commands";
/// Saga command: reserve a line's units (compensated by a release).
pub const CMD_RESERVE: &str = "shop.stock.reserve";
/// Saga command: give a line's reserved units back.
pub const CMD_RELEASE: &str = "shop.stock.release";
/// Saga command: sell a line's reserved units.
pub const CMD_SELL: &str = "shop.stock.sell";
/// Most lines an order may have.
pub const MAX_LINES: usize = 8;

/// A step's payload builder (a plain `fn`, hence one instance per line).
type Payload = fn(&Order) -> Value;

/// Per line: its reserve step, its sell step, and its commands' payload.
const LINES: [(&str, &str, Payload); MAX_LINES] = [
    ("reserve-1", "sell-1", line::<0>),
    ("reserve-2", "sell-2", line::<1>),
    ("reserve-3", "sell-3", line::<2>),
    ("reserve-4", "sell-4", line::<3>),
    ("reserve-5", "sell-5", line::<4>),
    ("reserve-6", "sell-6", line::<5>),
    ("reserve-7", "sell-7", line::<6>),
    ("reserve-8", "sell-8", line::<7>),
];

/// One line of an order: `quantity` (> 0) units of `sku`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OrderLine {
    pub(crate) sku: String,
    pub(crate) quantity: i64,
}

/// An order, as the saga carries it (`id` = saga id; reservations are
/// held under it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Order {
    pub(crate) id: String,
    pub(crate) customer: String,
    pub(crate) lines: Vec<OrderLine>,
}

/// `{target, order, quantity}` for line `I`; past the last line, 0 units of
/// the last line's SKU (nothing happens).
fn line<const I: usize>(o: &Order) -> Value {
    let (sku, quantity) = match (o.lines.get(I), o.lines.last()) {
        (Some(l), _) => (l.sku.as_str(), l.quantity),
        (None, last) => (last.map_or("", |l| l.sku.as_str()), 0),
    };
    json!({"target": {"category": STOCK_CATEGORY, "id": sku}, "order": o.id, "quantity": quantity})
}

/// Why an order is refused before it is placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OrderRejection {
    /// Customer empty or over 200 characters.
    #[error("customer must be 1-200 characters")]
    InvalidCustomer,
    /// No lines, or more than [`MAX_LINES`].
    #[error("an order has 1 to {MAX_LINES} lines, got {0}")]
    LineCount(usize),
    /// A line's quantity (sku, quantity) is not positive.
    #[error("quantity of sku {0} must be a positive integer, got {1}")]
    InvalidQuantity(String, i64),
}

impl OrderRejection {
    /// A stable name of the rule (the HTTP problem's `rule`).
    pub fn rule(&self) -> &'static str {
        match self {
            Self::InvalidCustomer => "customer-length",
            Self::LineCount(_) => "line-count",
            Self::InvalidQuantity(..) => "quantity-must-be-positive",
        }
    }
}

/// The order's own rules (pure): a customer, 1..=[`MAX_LINES`] lines of
/// positive quantities. SKUs are checked as ids by [`place_order`].
pub(crate) fn check_order(customer: &str, lines: &[OrderLine]) -> Result<(), OrderRejection> {
    if customer.trim().is_empty() || customer.chars().count() > 200 {
        return Err(OrderRejection::InvalidCustomer);
    }
    if lines.is_empty() || lines.len() > MAX_LINES {
        return Err(OrderRejection::LineCount(lines.len()));
    }
    match lines.iter().find(|l| l.quantity <= 0) {
        Some(l) => Err(OrderRejection::InvalidQuantity(l.sku.clone(), l.quantity)),
        None => Ok(()),
    }
}

/// The order saga, with `config`'s step and overall deadlines.
pub(crate) fn order_definition(config: &OrderConfig) -> Result<Definition<Order>, SagaError> {
    let mut def = Definition::<Order>::new(ORDER_SAGA).saga_deadline(config.saga_deadline);
    for (reserve, _, payload) in LINES {
        def = def
            .step(reserve)
            .with_compensation(CMD_RELEASE, payload)
            .deadline(config.deadline)
            .invoke(CMD_RESERVE, payload);
    }
    for (_, sell, payload) in LINES {
        def = def
            .step(sell)
            .deadline(config.deadline)
            .invoke(CMD_SELL, payload);
    }
    def.build()
}

/// Maps a saga command to a stock command.
pub(crate) fn stock_command(cmd: &Command) -> Result<StockCommand, String> {
    let p = &cmd.payload;
    let (Some(order), Some(quantity)) = (p["order"].as_str(), p["quantity"].as_i64()) else {
        return Err(format!(
            "command {} has no order or integer quantity",
            cmd.id
        ));
    };
    let order = order.to_owned();
    match cmd.command.as_str() {
        CMD_RESERVE => {
            let sku = command_target(cmd)
                .map_err(|e| e.to_string())?
                .id()
                .to_owned();
            Ok(StockCommand::Reserve {
                sku,
                order,
                quantity,
            })
        }
        CMD_RELEASE => Ok(StockCommand::Release { order, quantity }),
        CMD_SELL => Ok(StockCommand::Sell { order, quantity }),
        other => Err(format!("unknown stock command {other:?}")),
    }
}

/// The reply a SKU's stock sends after a command.
fn stock_reply(stock: &Stock) -> Value {
    json!({"available": stock.available, "reserved": stock.reserved()})
}

/// Order states: reserving or selling (or releasing after a failure).
pub(crate) const PLACED: &str = "placed";
/// Every line sold.
pub(crate) const CONFIRMED: &str = "confirmed";
/// Nothing reserved any more; the reason says why.
pub(crate) const CANCELLED: &str = "cancelled";
/// Stuck (a release or sale that cannot go through, a dead-lettered
/// command): an operator retries, resolves or abandons the saga.
pub(crate) const NEEDS_ATTENTION: &str = "needs_attention";

/// What one saga event does to an order: its new state (if it changes) and
/// the reason (if one is learnt). Pure; mirrors `react` for this
/// definition: a failure of the first step cancels at once (nothing to
/// undo), later ones release what was reserved, and the release of the
/// first line ends it.
pub(crate) fn order_transition(event: &SagaEvent) -> (Option<&'static str>, Option<String>) {
    let name = |step: usize| match (LINES.get(step), LINES.get(step.wrapping_sub(MAX_LINES))) {
        (Some(l), _) => l.0,
        (None, Some(l)) => l.1,
        _ => "?",
    };
    let failed = |step: usize, reason: String| ((step == 0).then_some(CANCELLED), Some(reason));
    let stuck = |reason: String| (Some(NEEDS_ATTENTION), Some(reason));
    match event {
        SagaEvent::StepSucceeded { step, .. } if *step == 2 * MAX_LINES - 1 => {
            (Some(CONFIRMED), None)
        }
        SagaEvent::StepFailed { step, reason, .. } => failed(*step, reason.clone()),
        SagaEvent::StepTimedOut { step, .. } => {
            failed(*step, format!("step {} timed out", name(*step)))
        }
        SagaEvent::DeadlinePassed {
            kind: CommandKind::Action,
            claimed: false,
            step,
            ..
        } => failed(
            *step,
            format!("the order's deadline passed at {}", name(*step)),
        ),
        SagaEvent::CompensationSucceeded { step: 0, .. } => (Some(CANCELLED), None),
        SagaEvent::CompensationFailed {
            step,
            reason,
            permanent: true,
            ..
        } => stuck(format!("releasing {} failed: {reason}", name(*step))),
        SagaEvent::DeadlinePassed { step, .. } => stuck(format!(
            "the order's deadline passed with {} unconfirmed",
            name(*step)
        )),
        SagaEvent::CommandDeadLettered {
            command, reason, ..
        } => stuck(format!("command {command} was dead-lettered: {reason}")),
        SagaEvent::Retried { .. } => (Some(PLACED), None),
        SagaEvent::Resolved { outcome, note } => (
            Some(match outcome {
                Outcome::Completed => CONFIRMED,
                Outcome::Compensated => CANCELLED,
            }),
            Some(format!("resolved by an operator: {note}")),
        ),
        SagaEvent::Abandoned { note } => (
            Some(CANCELLED),
            Some(format!("abandoned by an operator: {note}")),
        ),
        _ => (None, None),
    }
}

/// An order as the HTTP API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct OrderView {
    #[serde(flatten)]
    order: Order,
    /// `placed`, `confirmed`, `cancelled` or `needs_attention`.
    state: &'static str,
    /// Why it was cancelled or needs attention.
    reason: Option<String>,
    /// Position of its last transition.
    version: u64,
}

/// Order `id` from its saga log (`None` if unknown). Strongly consistent:
/// it reads the log, not the `orders` read model.
pub(crate) async fn order_status(store: &EventStore, id: &str) -> Result<Option<OrderView>, Error> {
    validate_token("order id", id)?;
    let log = sluice_sagas::read_log(store, ORDER_SAGA, id).await?;
    if log.version == 0 {
        return Ok(None);
    }
    let order = serde_json::from_value(log.data).map_err(|e| SagaError::Decode {
        what: "order data",
        reason: e.to_string(),
    })?;
    let (mut state, mut reason) = (PLACED, None);
    for r in &log.records {
        let (s, why) = order_transition(&r.event);
        (state, reason) = (s.unwrap_or(state), why.or(reason));
    }
    Ok(Some(OrderView {
        order,
        state,
        reason,
        version: log.version,
    }))
}

/// Places an order with id `id` (a fresh UUIDv7 when `None`) and starts its
/// saga; returns the id and the start. Placing the same id again starts
/// nothing and returns the first start.
pub(crate) async fn place_order(
    store: &EventStore,
    id: Option<String>,
    customer: String,
    lines: Vec<OrderLine>,
) -> Result<(String, sluice_sagas::Started), Error> {
    check_order(&customer, &lines)?;
    for l in &lines {
        validate_token("sku", &l.sku)?;
    }
    let id = id.unwrap_or_else(|| sluice_events::EventId::new().as_str().to_owned());
    validate_token("order id", &id)?;
    let def = order_definition(&OrderConfig::default())?;
    let order = Order {
        id: id.clone(),
        customer,
        lines,
    };
    let started = sluice_sagas::start(store, &def, &id, &order).await?;
    Ok((id, started))
}

/// How the order orchestrator runs.
#[derive(Debug, Clone)]
pub struct OrderConfig {
    /// Worker `shop-order-saga` and its timers; it watches the dead letters
    /// of `shop-stock-commands`.
    pub orchestrator: OrchestratorConfig,
    /// Deadline of each step (default 30 s).
    pub deadline: Duration,
    /// Overall deadline of an order (default 5 min).
    pub saga_deadline: Duration,
}

impl Default for OrderConfig {
    fn default() -> Self {
        let mut orchestrator = OrchestratorConfig::new(ORDER_ORCHESTRATOR);
        orchestrator.command_consumers = vec![STOCK_COMMANDS.to_owned()];
        Self {
            orchestrator,
            deadline: Duration::from_secs(30),
            saga_deadline: sluice_sagas::DEFAULT_SAGA_DEADLINE,
        }
    }
}

/// Runs the order orchestrator until `shutdown` (the `saga` role).
pub async fn run_order_orchestrator(
    store: &EventStore,
    config: &OrderConfig,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let def = Arc::new(order_definition(config)?);
    run_orchestrator(store, def, config.orchestrator.clone(), shutdown).await?;
    Ok(())
}

/// Runs the stock command handler until `shutdown` (the `worker` role);
/// `config` is usually `WorkerConfig::new(STOCK_COMMANDS)`.
pub async fn run_stock_commands(
    store: &EventStore,
    config: WorkerConfig,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    run_command_handler::<Stock>(store, config, stock_command, stock_reply, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sagas::{SagaState, Status, react};

    fn order(lines: &[(&str, i64)]) -> Order {
        Order {
            id: "o-1".into(),
            customer: "ann".into(),
            lines: lines
                .iter()
                .map(|(sku, quantity)| OrderLine {
                    sku: (*sku).into(),
                    quantity: *quantity,
                })
                .collect(),
        }
    }

    /// Runs `events` through `react` and `order_transition` side by side.
    fn run(o: Order, events: &[SagaEvent]) -> (Status, Vec<Command>, &'static str, Option<String>) {
        let def = order_definition(&OrderConfig::default()).unwrap();
        let mut state = SagaState::new("o-1", o);
        let (mut commands, mut order_state, mut reason) = (vec![], PLACED, None);
        for e in events {
            let (s, c) = react(&def, &state, e);
            state = s;
            commands.extend(c);
            let (os, why) = order_transition(e);
            order_state = os.unwrap_or(order_state);
            reason = why.or(reason);
        }
        (state.status, commands, order_state, reason)
    }

    fn ok(step: usize) -> SagaEvent {
        SagaEvent::StepSucceeded {
            step,
            attempt: 1,
            reply: json!({}),
        }
    }

    #[test]
    fn every_line_is_reserved_then_sold_and_unused_steps_ask_for_nothing() {
        let mut events = vec![SagaEvent::Started];
        events.extend((0..2 * MAX_LINES).map(ok));
        let (status, cmds, state, reason) = run(order(&[("apple", 2), ("pear", 1)]), &events);
        assert_eq!(status, Status::Completed);
        assert_eq!((state, reason), (CONFIRMED, None));
        let mapped: Vec<StockCommand> = cmds.iter().map(|c| stock_command(c).unwrap()).collect();
        assert_eq!(mapped.len(), 2 * MAX_LINES);
        assert_eq!(
            mapped[0],
            StockCommand::Reserve {
                sku: "apple".into(),
                order: "o-1".into(),
                quantity: 2
            }
        );
        assert_eq!(cmds[1].payload["target"]["id"], "pear");
        assert_eq!(cmds[2].payload["quantity"], 0);
        assert_eq!(
            mapped[MAX_LINES + 1],
            StockCommand::Sell {
                order: "o-1".into(),
                quantity: 1
            }
        );
    }

    #[test]
    fn a_line_short_of_stock_releases_the_earlier_lines_and_cancels() {
        let why = "insufficient stock for sku pear: available 1, asked 4";
        let failed = SagaEvent::StepFailed {
            step: 1,
            attempt: 1,
            reason: why.into(),
        };
        let o = order(&[("apple", 2), ("pear", 4)]);
        let (status, cmds, state, _) = run(o.clone(), &[SagaEvent::Started, ok(0), failed.clone()]);
        assert!(matches!(status, Status::Compensating { step: 0, .. }));
        assert_eq!(state, PLACED);
        let release = cmds.last().unwrap();
        assert_eq!(release.kind, CommandKind::Compensation);
        assert_eq!(
            stock_command(release),
            Ok(StockCommand::Release {
                order: "o-1".into(),
                quantity: 2
            })
        );
        let undone = SagaEvent::CompensationSucceeded {
            step: 0,
            attempt: 1,
        };
        let (status, _, state, reason) = run(o, &[SagaEvent::Started, ok(0), failed, undone]);
        assert!(matches!(status, Status::Compensated { .. }));
        assert_eq!((state, reason.as_deref()), (CANCELLED, Some(why)));
    }

    #[test]
    fn the_order_state_agrees_with_the_saga_model() {
        let fail = |step| SagaEvent::StepFailed {
            step,
            attempt: 1,
            reason: "no".into(),
        };
        let mut sell_fails = vec![SagaEvent::Started];
        sell_fails.extend((0..MAX_LINES).map(ok));
        sell_fails.push(fail(MAX_LINES));
        sell_fails.extend(
            (1..MAX_LINES)
                .rev()
                .map(|step| SagaEvent::CompensationSucceeded { step, attempt: 1 }),
        );
        sell_fails.push(SagaEvent::CompensationFailed {
            step: 0,
            attempt: 1,
            reason: "order o-1 holds 0 units, not 2".into(),
            permanent: true,
        });
        let paths = vec![
            vec![SagaEvent::Started, fail(0)],
            vec![
                SagaEvent::Started,
                SagaEvent::StepTimedOut {
                    step: 0,
                    attempt: 1,
                },
            ],
            sell_fails.clone(),
            [
                sell_fails,
                vec![SagaEvent::Resolved {
                    outcome: Outcome::Completed,
                    note: "sold by hand".into(),
                }],
            ]
            .concat(),
        ];
        for path in paths {
            let (status, _, state, reason) = run(order(&[("apple", 2)]), &path);
            let want = match status {
                Status::Completed
                | Status::Resolved {
                    outcome: Outcome::Completed,
                    ..
                } => CONFIRMED,
                Status::Compensated { .. } => CANCELLED,
                Status::NeedsAttention { .. } => NEEDS_ATTENTION,
                other => panic!("unexpected {other:?}"),
            };
            assert_eq!(state, want, "{path:?}");
            assert!(reason.is_some(), "{path:?}");
        }
    }

    #[test]
    fn orders_are_checked_before_they_are_placed() {
        let lines = |n: usize, q: i64| {
            vec![
                OrderLine {
                    sku: "a".into(),
                    quantity: q
                };
                n
            ]
        };
        assert_eq!(check_order("ann", &lines(1, 1)), Ok(()));
        assert_eq!(
            check_order(" ", &lines(1, 1)),
            Err(OrderRejection::InvalidCustomer)
        );
        assert_eq!(check_order("ann", &[]), Err(OrderRejection::LineCount(0)));
        assert_eq!(
            check_order("ann", &lines(MAX_LINES + 1, 1)),
            Err(OrderRejection::LineCount(MAX_LINES + 1))
        );
        assert!(matches!(
            check_order("ann", &lines(2, 0)),
            Err(OrderRejection::InvalidQuantity(_, 0))
        ));
    }

    #[test]
    fn names_are_pinned() {
        assert_eq!(ORDER_SAGA, "order");
        assert_eq!(ORDER_ORCHESTRATOR, "shop-order-saga");
        assert_eq!(STOCK_COMMANDS, "shop-stock-commands");
        assert_eq!(
            (CMD_RESERVE, CMD_RELEASE, CMD_SELL),
            (
                "shop.stock.reserve",
                "shop.stock.release",
                "shop.stock.sell"
            )
        );
    }
}
