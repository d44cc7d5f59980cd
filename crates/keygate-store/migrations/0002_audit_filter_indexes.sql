-- Keyset paging of the audit log filtered by host or decision (dashboard and
-- `GET /api/v1/audit?host=…|decision=…`) stays index-backed at millions of rows.
CREATE INDEX IF NOT EXISTS audit_host_seq ON audit (host, seq);
CREATE INDEX IF NOT EXISTS audit_decision_seq ON audit (decision, seq);
-- Dashboard counts per decision over the last hour / 24 h: a covering range scan.
CREATE INDEX IF NOT EXISTS audit_ts_decision ON audit (ts_ms, decision);
