-- What the MESH edge did with each delivery it pushes (src/store/mesh.rs):
-- the same record as on sled, by delivery id, written before a send and
-- again once MESH accepted it.
CREATE TABLE mesh (
    delivery_id bigint PRIMARY KEY,
    record jsonb NOT NULL
);
