-- audit_ts_decision (ts_ms, decision) serves every range scan on ts_ms that
-- audit_ts (ts_ms) did; the narrower index only cost one more B-tree insert
-- per audit record on the request path's writer.
DROP INDEX IF EXISTS audit_ts;
