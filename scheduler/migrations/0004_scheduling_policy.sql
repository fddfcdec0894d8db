-- Scheduling policy: the protocol versions the scheduler knows, and job weights (memory budgets).

-- A batch is accepted only for an active version; a retired version's unfinished batches still
-- prove. `vk_hash` is the final (compression) circuit's verification key hash, 64 hex digits
-- ('' until an operator records it).
CREATE TABLE protocol_versions (
    minor             INT NOT NULL,
    patch             INT NOT NULL,
    vk_hash           TEXT NOT NULL DEFAULT '',
    status            TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'retired')),
    registered_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    retired_at        TIMESTAMPTZ,
    PRIMARY KEY (minor, patch)
);

-- Versions of batches submitted before this table existed are known.
INSERT INTO protocol_versions (minor, patch) SELECT DISTINCT protocol_minor, protocol_patch FROM batches;

ALTER TABLE batches ADD FOREIGN KEY (protocol_minor, protocol_patch) REFERENCES protocol_versions (minor, patch);

-- A job's weight: its peak memory in MiB (the --job-weights file, when the job was planned); a
-- worker is never leased more than its memory budget.
ALTER TABLE jobs ADD COLUMN weight_mib INT NOT NULL DEFAULT 0;

-- The lease order key: the batch's priority times the ageing period minus the batch's submission
-- time (seconds), so "priority + 1 point per ageing period waited" is one column, and the lease
-- statement reads the queue in index order (the scheduler recomputes it for unfinished jobs when
-- it starts, with its --priority-ageing-secs). 300: the default ageing period.
ALTER TABLE jobs ADD COLUMN urgency DOUBLE PRECISION NOT NULL DEFAULT 0;
UPDATE jobs j SET urgency = j.priority * 300 - extract(epoch FROM b.created_at)::float8
    FROM batches b WHERE b.batch_number = j.batch_number;
DROP INDEX jobs_queue;
CREATE INDEX jobs_lease_order ON jobs (kind, urgency DESC, batch_number, aggregation_round DESC, id) WHERE status = 'queued';
