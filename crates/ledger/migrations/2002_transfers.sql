-- The transfers read model: one row per transfer saga, folded from
-- events.saga-transfer.<id>. Portable SQL (SQLite and PostgreSQL).
CREATE TABLE IF NOT EXISTS transfers (
    id TEXT PRIMARY KEY,
    from_account TEXT NOT NULL,
    to_account TEXT NOT NULL,
    -- Integer minor units.
    amount BIGINT NOT NULL,
    -- pending, completed, compensated or needs_attention.
    state TEXT NOT NULL,
    reason TEXT,
    started_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    -- Position of the last saga event applied.
    version BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS transfers_by_state ON transfers (state, id);
