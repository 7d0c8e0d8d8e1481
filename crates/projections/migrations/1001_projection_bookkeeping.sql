-- Bookkeeping of the projection runtime. Portable SQL: the same file runs on
-- SQLite and PostgreSQL (one code path through sqlx's Any driver).

-- One row per projection: the last stream sequence whose effect is in the
-- read model. Written in the same transaction as the read-model rows.
CREATE TABLE IF NOT EXISTS sluice_checkpoints (
    projection TEXT PRIMARY KEY,
    position BIGINT NOT NULL,
    -- Wall-clock time (Unix ms) the last event at `position` was appended.
    event_time_ms BIGINT NOT NULL DEFAULT 0,
    updated_at_ms BIGINT NOT NULL DEFAULT 0,
    -- Set while the `halt` policy stopped the projection on a bad event.
    halted_at_position BIGINT,
    halted_reason TEXT
);

-- Aggregates held behind a dead letter: later events of them are not applied
-- by this projection (sequence-aware dead-lettering).
CREATE TABLE IF NOT EXISTS sluice_parked (
    projection TEXT NOT NULL,
    stream TEXT NOT NULL,
    behind_position BIGINT NOT NULL,
    parked_at_ms BIGINT NOT NULL,
    PRIMARY KEY (projection, stream)
);

-- Every event a projection did not apply, with the reason.
CREATE TABLE IF NOT EXISTS sluice_dead_letters (
    projection TEXT NOT NULL,
    position BIGINT NOT NULL,
    stream TEXT NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    failed_at_ms BIGINT NOT NULL,
    PRIMARY KEY (projection, position)
);
