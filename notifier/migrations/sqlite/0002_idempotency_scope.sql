-- Idempotency keys belong to the caller that sent them: the hex SHA-256 hash of its API key, or
-- '' when the notifier runs without API keys. Two publishers may then use the same key text
-- without blocking each other or learning each other's event ids.
--
-- SQLite cannot change a primary key in place, so the table is copied into a new one. Keys
-- stored before this migration get the scope ''. With API keys configured, a retry that spans
-- the upgrade is not recognised and publishes the event again.
CREATE TABLE idempotency_keys_scoped (
    scope TEXT NOT NULL DEFAULT '',
    key TEXT NOT NULL,
    event_id TEXT NOT NULL,
    partition INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    -- SHA-256 of the event's channel, type, data and user_id.
    fingerprint TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);

INSERT INTO idempotency_keys_scoped (scope, key, event_id, partition, seq, fingerprint, created_ms)
SELECT '', key, event_id, partition, seq, fingerprint, created_ms FROM idempotency_keys;

DROP TABLE idempotency_keys;
ALTER TABLE idempotency_keys_scoped RENAME TO idempotency_keys;
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_ms);
