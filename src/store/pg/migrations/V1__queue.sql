-- The queue contract on PostgreSQL (docs/store-engines.md). Each record is
-- kept whole as JSON (the same serde structs as the sled engine) beside the
-- columns the queries select and order on; the engine writes both together.

-- Ids are handed out under this row's lock, so they are gapless and a
-- rolled-back submit takes none. Submits serialise on it (dedupe included).
CREATE TABLE counters (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    last_handover bigint NOT NULL,
    last_delivery bigint NOT NULL
);
INSERT INTO counters VALUES (true, 0, 0);

-- The audit chain's head: every transaction locks it last, just before its
-- entries are appended, so the chain is one sequence across every node.
CREATE TABLE audit_head (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row)
);
INSERT INTO audit_head VALUES (true);

-- `entry` holds the exact bytes the chain hashes (an AuditEntry as JSON).
CREATE TABLE audit (
    seq bigint PRIMARY KEY,
    at_ms bigint NOT NULL,
    action text NOT NULL,
    entry bytea NOT NULL
);
CREATE INDEX audit_by_action ON audit (action, at_ms);

CREATE TABLE handovers (
    id bigint PRIMARY KEY,
    sender text NOT NULL,
    message_id text NOT NULL,
    event text NOT NULL,
    patient_key text NOT NULL,
    submitted_at_ms bigint NOT NULL,
    record jsonb NOT NULL,
    UNIQUE (sender, message_id)
);
CREATE INDEX handovers_by_time ON handovers (event, submitted_at_ms);

-- Sealed at rest: the payload under its own data key, the key wrapped by
-- the master key (src/store/crypt.rs), neither readable without the other.
CREATE TABLE payloads (
    handover_id bigint PRIMARY KEY REFERENCES handovers (id),
    data_key bytea,
    sealed bytea NOT NULL
);

CREATE TABLE deliveries (
    id bigint PRIMARY KEY,
    handover_id bigint NOT NULL REFERENCES handovers (id),
    mailbox text NOT NULL,
    patient_key text NOT NULL,
    sender text NOT NULL,
    event text NOT NULL,
    state text NOT NULL,
    urgent boolean NOT NULL,
    attempt integer NOT NULL,
    max_attempts integer,
    lease_until_ms bigint,
    not_before_ms bigint,
    -- Leased when a newer summary superseded it: never offered again.
    stale boolean NOT NULL,
    superseded_by bigint,
    due_ms bigint,
    overdue_reported boolean NOT NULL,
    record jsonb NOT NULL
);
CREATE INDEX deliveries_live ON deliveries (mailbox, patient_key, id)
    WHERE state IN ('queued', 'leased', 'parked');
CREATE INDEX deliveries_leases ON deliveries (lease_until_ms) WHERE state = 'leased';
CREATE INDEX deliveries_deadlines ON deliveries (due_ms)
    WHERE state IN ('queued', 'leased', 'parked') AND NOT overdue_reported;
CREATE INDEX deliveries_of_patient ON deliveries (patient_key)
    WHERE state IN ('queued', 'leased', 'parked', 'quarantined');
CREATE INDEX deliveries_quarantined ON deliveries (mailbox, id) WHERE state = 'quarantined';
CREATE INDEX deliveries_of_handover ON deliveries (handover_id);
CREATE INDEX deliveries_superseded_by ON deliveries (superseded_by)
    WHERE superseded_by IS NOT NULL;

-- One patient across identifiers (keyed hashes only, never in clear).
CREATE TABLE identities (
    identifier text PRIMARY KEY,
    patient_key text NOT NULL
);
CREATE TABLE patients (
    patient_key text PRIMARY KEY,
    record jsonb NOT NULL
);
CREATE TABLE identity_conflicts (
    id bigserial PRIMARY KEY,
    record jsonb NOT NULL
);

-- The latest handover per (patient, sender, event), for supersession.
CREATE TABLE lineage (
    patient_key text NOT NULL,
    sender text NOT NULL,
    event text NOT NULL,
    handover_id bigint NOT NULL,
    PRIMARY KEY (patient_key, sender, event)
);

CREATE TABLE registry (
    code text PRIMARY KEY,
    record bytea NOT NULL
);
