-- A disabled agent keeps its grants and audit history but its token is not
-- accepted (it is left out of the gateway's snapshot).
ALTER TABLE agents ADD COLUMN disabled BIGINT NOT NULL DEFAULT 0;
