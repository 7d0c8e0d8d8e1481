//! The `sluice` binary (being written).
fn main() {}
