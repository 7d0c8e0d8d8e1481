//! The reference domain: accounts (open, deposit, withdraw, close), their
//! read models, and the transfer saga, built only on the other Sluice crates.
//!
//! Not built yet: this crate reserves its place in the dependency order.
