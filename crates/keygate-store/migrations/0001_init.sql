-- Portable between SQLite and PostgreSQL: TEXT ids, BIGINT epoch-ms times,
-- binary values stored as base64 TEXT.
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE secrets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    host_pattern TEXT NOT NULL,
    path_pattern TEXT NOT NULL,
    header TEXT NOT NULL,
    format TEXT NOT NULL,
    version BIGINT NOT NULL,
    key_id TEXT NOT NULL,
    wrapped_key TEXT NOT NULL,
    ciphertext TEXT NOT NULL,
    hint TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    rotated_ms BIGINT
);

CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    created_ms BIGINT NOT NULL
);

CREATE TABLE grants (
    agent_id TEXT NOT NULL,
    secret_id TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (agent_id, secret_id)
);

CREATE TABLE audit (
    seq BIGINT PRIMARY KEY,
    ts_ms BIGINT NOT NULL,
    agent TEXT,
    method TEXT NOT NULL,
    scheme TEXT NOT NULL,
    host TEXT NOT NULL,
    port BIGINT NOT NULL,
    path TEXT NOT NULL,
    status BIGINT NOT NULL,
    decision TEXT NOT NULL,
    reason TEXT,
    secrets TEXT NOT NULL,
    duration_us BIGINT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);

CREATE INDEX audit_agent_seq ON audit (agent, seq);
CREATE INDEX audit_ts ON audit (ts_ms);
