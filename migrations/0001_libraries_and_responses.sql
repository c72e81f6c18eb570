-- Libraries shared by every replica: one row per library, its versions as append-only rows.
-- Each creation of a name is a new row (a new `id`), so a replica that still holds a deleted
-- library of the same name can tell it from the new one.
CREATE TABLE libraries (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    -- The settings as JSON text (TEXT, not JSONB: JSONB refuses a \u0000 escape that
    -- serde_json writes for a NUL in a string).
    settings TEXT NOT NULL,
    -- Raised by every settings write, so that replicas reload what changed.
    settings_rev BIGINT NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per library version, never updated: the primary key is what makes two replicas
-- committing at once take different numbers (the second one's insert fails, and it catches up
-- and tries again).
CREATE TABLE versions (
    library BIGINT NOT NULL REFERENCES libraries (id) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    record TEXT NOT NULL,
    committed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (library, version)
);

-- Stored Responses API objects, so that `previous_response_id` works on every replica.
CREATE TABLE responses (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX responses_by_age ON responses (created_at, id);
