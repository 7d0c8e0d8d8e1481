//! Durable consumer runtime (issue: workers and dead letters): handlers that
//! return `Ok`, `Transient` or `Permanent`, per-aggregate ordering with
//! parallelism, retries with backoff, sequence-aware dead-lettering to the
//! `DLQ` stream, and the operator API behind `sluice dlq`.
//!
//! Not built yet: this crate only reserves its place in the dependency order
//! `events` ← `workers` ← `projections`, `sagas` ← `ledger` ← `sluice`.
