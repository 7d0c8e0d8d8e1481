-- Shop read models. Portable SQL: the same file runs on SQLite and
-- PostgreSQL. Versions 3xxx belong to the shop (the projection runtime
-- uses 1xxx, the ledger 2xxx).

-- One row per SKU: the sum of its stock events.
CREATE TABLE IF NOT EXISTS stock_levels (
    sku TEXT PRIMARY KEY,
    available BIGINT NOT NULL,
    reserved BIGINT NOT NULL,
    sold BIGINT NOT NULL,
    -- Position of the last event applied to this SKU.
    version BIGINT NOT NULL,
    updated_at TEXT NOT NULL
);

-- One row per order saga (events.saga-order.<id>).
CREATE TABLE IF NOT EXISTS orders (
    id TEXT PRIMARY KEY,
    customer TEXT NOT NULL,
    -- The lines as JSON: [{"sku", "quantity"}].
    lines TEXT NOT NULL,
    -- placed, confirmed, cancelled or needs_attention.
    state TEXT NOT NULL,
    reason TEXT,
    placed_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    -- Position of the last saga event applied.
    version BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS orders_by_state ON orders (state, id);
