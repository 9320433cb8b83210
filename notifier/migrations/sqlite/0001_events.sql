-- The store of record. Sequence numbers are per partition and gap-free: the committer raises
-- partitions.last_seq in the transaction that inserts the events, so SQLite's write lock orders
-- concurrent writers and a rolled-back transaction gives its numbers back.
CREATE TABLE partitions (
    partition INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE events (
    partition INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    channel TEXT NOT NULL,
    event_type TEXT NOT NULL,
    -- JSON text kept byte for byte, so clients receive exactly what was published.
    data TEXT NOT NULL,
    user_id TEXT NOT NULL DEFAULT '',
    idempotency_key TEXT,
    traceparent TEXT NOT NULL DEFAULT '',
    tracestate TEXT NOT NULL DEFAULT '',
    -- Commit time in milliseconds since the Unix epoch.
    ts_ms INTEGER NOT NULL,
    PRIMARY KEY (partition, seq)
);

-- History reads one channel's events within its partition in order.
CREATE INDEX events_channel ON events (channel, partition, seq);
-- The retention sweeper deletes the oldest events first.
CREATE INDEX events_ts ON events (ts_ms);

CREATE TABLE idempotency_keys (
    key TEXT PRIMARY KEY,
    event_id TEXT NOT NULL,
    partition INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    -- SHA-256 of the event's channel, type, data and user_id.
    fingerprint TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);

CREATE INDEX idempotency_keys_created ON idempotency_keys (created_ms);
