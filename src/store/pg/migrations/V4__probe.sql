-- The health probe's write (`PgStore::probe`): a row inserted and deleted in
-- one transaction. A transaction that only takes a transaction id writes no
-- WAL of its own, so PostgreSQL commits it without waiting for the
-- synchronous standby; this one writes WAL, so its commit waits as a
-- submit's does. No row is ever committed.
CREATE TABLE store_probe (at_ms bigint NOT NULL);
