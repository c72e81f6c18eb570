-- Recorded completions and the feedback on them, shared so that feedback on an answer one
-- replica served is accepted by any replica. Records and feedback are JSON text, as in the
-- file journals; the columns beside them are what is searched or bounded.
CREATE TABLE traffic_records (
    id TEXT PRIMARY KEY,
    library TEXT NOT NULL,
    created TIMESTAMPTZ NOT NULL,
    bytes BIGINT NOT NULL,
    -- Whether it has feedback already: only the first counts towards credit and trials.
    rated BOOLEAN NOT NULL DEFAULT false,
    record TEXT NOT NULL
);
CREATE INDEX traffic_records_by_library ON traffic_records (library, created);

CREATE TABLE traffic_feedback (
    id TEXT PRIMARY KEY,
    library TEXT NOT NULL,
    created TIMESTAMPTZ NOT NULL,
    bytes BIGINT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX traffic_feedback_by_library ON traffic_feedback (library, created);

-- When automatic learning from a library's traffic last started.
CREATE TABLE traffic_auto (
    library TEXT PRIMARY KEY,
    started TIMESTAMPTZ NOT NULL
);
