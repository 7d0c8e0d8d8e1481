//! Placeholder; filled by the projections work.
