-- Filtering the audit log by decision. Most records are `injected`: a
-- newest-first walk of the table finds them at once, so only the rarer
-- decisions (denied, error, passthrough) keep an index, and the common
-- record costs one B-tree insert fewer on the audit writer (bench/README.md).
-- Queries for a rarer decision repeat the index's condition so that both
-- SQLite and PostgreSQL use it (Store::audit_query).
DROP INDEX IF EXISTS audit_decision_seq;
CREATE INDEX IF NOT EXISTS audit_decision_rare_seq ON audit (decision, seq) WHERE decision <> 'injected';
