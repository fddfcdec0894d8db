-- The house keeper deletes the artifacts of finished batches after a retention period and records
-- when; a batch's job rows stay (small: its history for Admin), its lease history goes.
ALTER TABLE batches ADD COLUMN artifacts_deleted_at TIMESTAMPTZ;
CREATE INDEX batches_to_clean ON batches (finished_at) WHERE artifacts_deleted_at IS NULL AND status <> 'proving';
