-- The set-based dispatch pass (scheduler/src/db/lease.rs): queued jobs by class (kind,
-- aggregation round, circuit id, protocol version), each class in lease order. The dispatcher
-- finds the classes with queued jobs by a skip scan of this index (one probe per class) and each
-- lease statement reads only the ranges of its worker's eligible classes, so neither grows with
-- the number of queued jobs of other classes. It replaces jobs_lease_order (one range per kind).
CREATE INDEX jobs_queued_class ON jobs (kind, aggregation_round, circuit_id, protocol_minor, protocol_patch,
                                        urgency DESC, batch_number, id) WHERE status = 'queued';
DROP INDEX jobs_lease_order;

-- A hand-back (a draining worker returns a lease unfinished) is its own lease outcome, not a failure.
ALTER TABLE leases DROP CONSTRAINT leases_outcome_check;
ALTER TABLE leases ADD CONSTRAINT leases_outcome_check
    CHECK (outcome IN ('succeeded', 'failed', 'handed_back', 'expired', 'unsent', 'superseded', 'rejected'));

-- Settings the scheduler last started with that change stored rows: the start-up rerank of the
-- queue runs only when `priority_ageing_secs` differs from the one recorded here.
CREATE TABLE scheduler_settings (
    name              TEXT PRIMARY KEY,
    value             DOUBLE PRECISION NOT NULL
);

-- Readiness is a counter: a waiting job's inputs not yet succeeded. A completion decrements the
-- jobs its job feeds and queues those that reach 0, in its own statement (no re-check of every
-- input); a rejected input proof (the next round found it invalid) adds it back.
ALTER TABLE jobs ADD COLUMN unfinished_inputs INT NOT NULL DEFAULT 0;
UPDATE jobs j SET unfinished_inputs = (SELECT count(*) FROM job_inputs ji JOIN jobs i ON i.id = ji.input_job_id
                                       WHERE ji.job_id = j.id AND i.status <> 'succeeded')
WHERE j.status = 'waiting';
