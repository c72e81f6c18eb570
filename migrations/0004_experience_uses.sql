-- How many served requests had each experience injected, summed over replicas: each replica
-- adds what it counted since its last flush (at most every two seconds), one statement per
-- flush, never a row write per request.
CREATE TABLE experience_uses (
    library BIGINT NOT NULL REFERENCES libraries (id) ON DELETE CASCADE,
    experience TEXT NOT NULL,
    uses BIGINT NOT NULL,
    PRIMARY KEY (library, experience)
);
