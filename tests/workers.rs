//! Placeholder; filled by the workers work.
