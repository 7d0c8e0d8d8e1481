//! A second Sluice domain, built only on the platform crates: stock per SKU
//! (receive, reserve, release, sell), orders, and an order saga that
//! reserves every line, then sells the reservations, or releases them and
//! cancels the order with the reason.
//!
//! [`module`] hands all of it to `sluice-host`: [`catalog`] (the event
//! types and schemas the public append checks), [`MIGRATOR`] (the read
//! models' tables), the projections `stock_levels` and `orders`, the
//! `worker` role [`run_stock_commands`], the `saga` role
//! [`run_order_orchestrator`], the HTTP [`routes`] and their OpenAPI paths.
#![warn(clippy::unwrap_used)]

mod http;
mod module;
mod order;
mod read_models;
mod stock;

use sluice_events::{EventStore, ExecuteError, execute};

pub use http::routes;
pub use module::{Shop, module};
pub use order::{
    CMD_RELEASE, CMD_RESERVE, CMD_SELL, MAX_LINES, ORDER_ORCHESTRATOR, ORDER_SAGA, OrderConfig,
    OrderRejection, STOCK_COMMANDS, run_order_orchestrator, run_stock_commands,
};
pub use read_models::{ORDERS, Orders, STOCK_LEVELS, StockLevels};
pub use stock::{RECEIVED, RELEASED, RESERVED, SOLD, STOCK_CATEGORY, StockRejection, catalog};

/// Schema of the shop's read models (versions 3xxx; SQLite and PostgreSQL).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Receives `quantity` units of `sku`; returns the event's position.
async fn receive_stock(store: &EventStore, sku: &str, quantity: i64) -> Result<u64, Error> {
    let command = stock::StockCommand::Receive { quantity };
    match execute::<stock::Stock>(store, sku, &command, 8).await {
        Ok(o) => Ok(o.positions.last().copied().unwrap_or(o.version)),
        Err(ExecuteError::Rejected(r)) => Err(Error::Stock(r)),
        Err(ExecuteError::Store(e)) => Err(Error::Events(e)),
    }
}

/// The one error type of the shop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The event store failed, or an id is invalid.
    #[error(transparent)]
    Events(#[from] sluice_events::Error),
    /// The saga runtime failed.
    #[error(transparent)]
    Sagas(#[from] sluice_sagas::SagaError),
    /// The stock refused the command.
    #[error("command refused: {0}")]
    Stock(#[source] StockRejection),
    /// The order breaks one of its rules; nothing was placed.
    #[error("order refused: {0}")]
    Order(#[from] OrderRejection),
}
