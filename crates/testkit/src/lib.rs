//! Test harness: real nats-server processes on free loopback ports with
//! private stores (killed on drop, restartable, kill -9 able), a 3-node
//! cluster, fresh PostgreSQL databases, and given/when/then for aggregates.
//!
//! Tests never skip when a server is missing: they fail with the reason.

pub mod counter;
mod gwt;
mod nats;
mod postgres;

pub use gwt::{Given, given};
pub use nats::{NatsCluster, NatsServer};
pub use postgres::{TEST_DATABASE_URL_ENV, TestDatabase};
