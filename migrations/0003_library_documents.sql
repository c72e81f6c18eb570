-- A library's documents beside its versions (its proposals waiting for review), one row per
-- library and name, rewritten whole under the library's document lock.
CREATE TABLE library_documents (
    library BIGINT NOT NULL REFERENCES libraries (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (library, name)
);
