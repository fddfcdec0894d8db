-- Every lease ever granted, and how it ended: the history that shows nothing ran twice
-- (`make chaos` reads it). A job's current lease is also jobs.lease_id.
CREATE TABLE leases (
    lease_id          UUID PRIMARY KEY,
    job_id            BIGINT NOT NULL REFERENCES jobs,
    -- The connection it was granted to (workers.id); a heartbeat from another stream moves jobs.leased_to only.
    worker            TEXT NOT NULL,
    granted_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    ended_at          TIMESTAMPTZ,
    -- NULL while open. succeeded; failed (the worker reported it); expired (deadline passed);
    -- unsent (never reached its worker: the attempt does not count); superseded (another lease
    -- of the job succeeded first, or the job was requeued by an operator)
    outcome           TEXT CHECK (outcome IN ('succeeded', 'failed', 'expired', 'unsent', 'superseded')),
    error             TEXT
);
CREATE INDEX leases_job ON leases (job_id);
-- First valid result wins: a second success of a job cannot be recorded.
CREATE UNIQUE INDEX leases_one_success_per_job ON leases (job_id) WHERE outcome = 'succeeded';
-- The expiry timer asks for the earliest deadline.
CREATE INDEX jobs_lease_deadline ON jobs (lease_deadline) WHERE status = 'leased';
