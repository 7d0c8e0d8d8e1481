-- Ledger read models. Portable SQL: the same file runs on SQLite and
-- PostgreSQL. Versions 2xxx belong to the ledger (the projection runtime's
-- bookkeeping uses 1xxx).

-- One row per account: the fold of its events.
CREATE TABLE IF NOT EXISTS account_balances (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    currency TEXT NOT NULL,
    -- Integer minor units (cents); never floating point.
    balance BIGINT NOT NULL,
    -- Position of the last event applied to this account (its version).
    version BIGINT NOT NULL,
    status TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

-- One row per account event, keyed by its stream sequence: a duplicate
-- apply would violate the key instead of passing unnoticed.
CREATE TABLE IF NOT EXISTS account_activity (
    position BIGINT PRIMARY KEY,
    account TEXT NOT NULL,
    event_type TEXT NOT NULL,
    amount BIGINT,
    time TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS account_activity_by_account ON account_activity (account, position);
