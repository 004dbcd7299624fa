-- Retention on PostgreSQL (docs/store-engines.md, "Retention"): the same
-- policy as the sled engine, worked out in SQL by a pass that several
-- nodes may run at once (each step takes an advisory lock and row locks).

-- Due work is found from each handover's record (finished, not shredded):
-- no schedule to keep, and a period changed since applies at once.
CREATE INDEX handovers_finished ON handovers (((record->>'finished_at_ms')::bigint))
    WHERE record->>'finished_at_ms' IS NOT NULL;

-- What is left of a handover whose tracking metadata was removed: Track
-- answers its sender "removed under the retention policy" until it goes.
CREATE TABLE tombstones (
    handover_id bigint PRIMARY KEY,
    sender text NOT NULL,
    message_id text NOT NULL,
    removed_at_ms bigint NOT NULL
);
CREATE INDEX tombstones_by_message ON tombstones (sender, message_id, removed_at_ms);
CREATE INDEX tombstones_by_time ON tombstones (removed_at_ms);

-- A patient left with nothing tracked: their identity links and lineage
-- are checked again (and removed) at `due_ms`.
CREATE TABLE identity_expiry (
    patient_key text PRIMARY KEY,
    due_ms bigint NOT NULL
);
CREATE INDEX identity_expiry_by_time ON identity_expiry (due_ms);

-- The counters operators see, and the signed audit cut the chain verifies
-- from once entries past the audit period were removed.
CREATE TABLE retention_state (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    payloads_shredded bigint NOT NULL,
    metadata_removed bigint NOT NULL,
    identity_removed bigint NOT NULL,
    audit_cut jsonb
);
INSERT INTO retention_state VALUES (true, 0, 0, 0, NULL);

-- An expiring patient's links are found by the key they point at.
CREATE INDEX identities_by_patient ON identities (patient_key);
