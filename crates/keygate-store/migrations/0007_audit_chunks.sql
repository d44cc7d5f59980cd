-- The audit log in chunks: one row per burst the writer commits (up to 512
-- records, as a JSON array of rows), instead of one row and three or four
-- index entries per record. A SQLite row per record cost the writer ~3 µs
-- of CPU per request whatever its columns, the largest single cost left on
-- the request path's machine (bench/README.md, "Audit chunks"). Each record
-- keeps its place in the SHA-256 chain; a chunk only groups them.
--
-- The summary columns serve the dashboard without opening the records:
-- seq range (keyset paging), time range (time filters, 24-hour counts) and
-- per-decision counts. `audit verify` checks every summary against the
-- records it describes.
CREATE TABLE audit_chunk (
    first_seq BIGINT PRIMARY KEY,
    last_seq BIGINT NOT NULL,
    ts_min BIGINT NOT NULL,
    ts_max BIGINT NOT NULL,
    n_injected BIGINT NOT NULL,
    n_passthrough BIGINT NOT NULL,
    n_denied BIGINT NOT NULL,
    n_error BIGINT NOT NULL,
    records TEXT NOT NULL
);
CREATE INDEX audit_chunk_ts_min ON audit_chunk (ts_min);
CREATE INDEX audit_chunk_ts_max ON audit_chunk (ts_max);

-- Which chunks hold records of an agent, a host, a decision, or a pair of
-- them (`a:`, `h:`, `d:`, `ad:`, `ah:`, `hd:`), with the newest such
-- record's time: filtered paging reads only those chunks. One entry per
-- distinct key per chunk, not per record. `audit verify` checks them too.
CREATE TABLE audit_chunk_key (
    key TEXT NOT NULL,
    first_seq BIGINT NOT NULL,
    last_ts BIGINT NOT NULL,
    PRIMARY KEY (key, first_seq)
);
CREATE INDEX audit_chunk_key_chunk ON audit_chunk_key (first_seq);
-- The rows of the per-record `audit` table of migrations 0001-0006 are
-- moved into chunks, and the table dropped, by Store::open (Rust: the JSON
-- encoding is the writer's), in one transaction.
