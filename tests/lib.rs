//! End-to-end tests live in this package's test targets.

/// The README's Rust sample, compiled as a doctest so it cannot rot.
#[doc = include_str!("../README.md")]
#[allow(dead_code)]
mod readme {}
