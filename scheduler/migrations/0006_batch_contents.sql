-- The SHA-256 of a batch's file as the gateway submitted it: a later submission of the same
-- number with other contents is refused by the scheduler itself, even after the house keeper
-- deleted the stored file the gateway used to compare against. NULL for batches submitted
-- before this column (or without a hash): not checked.
ALTER TABLE batches ADD COLUMN content_sha256 BYTEA;
