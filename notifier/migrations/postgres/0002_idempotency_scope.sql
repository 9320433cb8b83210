-- Idempotency keys belong to the caller that sent them: the hex SHA-256 hash of its API key, or
-- '' when the notifier runs without API keys. Two publishers may then use the same key text
-- without blocking each other or learning each other's event ids.
--
-- Keys stored before this migration get the scope ''. With API keys configured, a retry that
-- spans the upgrade is not recognised and publishes the event again.
ALTER TABLE idempotency_keys ADD COLUMN scope TEXT NOT NULL DEFAULT '';
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (scope, key);
