//! Placeholder; filled by the group_commit work.
