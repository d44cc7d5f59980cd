-- Bytes piped each way over an upgraded (WebSocket) connection; NULL for
-- ordinary requests. Covered by the hash chain only when set, so records
-- written before this migration still verify.
ALTER TABLE audit ADD COLUMN bytes_up BIGINT;
ALTER TABLE audit ADD COLUMN bytes_down BIGINT;
