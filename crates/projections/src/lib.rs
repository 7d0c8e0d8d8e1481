//! Projections (issue: projections, queries and replay): batches of events
//! applied to SQL read models (SQLite and PostgreSQL through sqlx) with the
//! checkpoint in the same transaction, blue/green rebuild and read-your-writes.
//!
//! Not built yet: this crate reserves its place in the dependency order.
