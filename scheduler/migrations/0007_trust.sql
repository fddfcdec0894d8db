-- Trust (issue 8). With TLS on, a lease is bound to the certificate identity (subject) of the
-- worker it was granted to and, for a WVG lease, of the prover matched with it: only those may
-- heartbeat, complete or fail it. NULL: granted without TLS, not checked.
ALTER TABLE leases ADD COLUMN identity TEXT;
ALTER TABLE leases ADD COLUMN prover_identity TEXT;
ALTER TABLE workers ADD COLUMN identity TEXT;

-- Every Admin change, with who made it and how it ended.
CREATE TABLE audit_log (
    id        BIGSERIAL PRIMARY KEY,
    at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    identity  TEXT NOT NULL,
    method    TEXT NOT NULL,
    details   TEXT NOT NULL,
    outcome   TEXT NOT NULL
);

-- Lying provers: a proof that does not verify natively when the next round reads it is
-- rejected. Its job is queued again, its lease's outcome becomes 'rejected', the worker that
-- handed it in gets a strike, and a worker name with --quarantine-after-strikes strikes is
-- quarantined (no more leases or witness vectors) until an operator releases it.
ALTER TABLE leases DROP CONSTRAINT leases_outcome_check;
ALTER TABLE leases ADD CONSTRAINT leases_outcome_check
    CHECK (outcome IN ('succeeded', 'failed', 'expired', 'unsent', 'superseded', 'rejected'));

CREATE TABLE strikes (
    id          BIGSERIAL PRIMARY KEY,
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    worker_name TEXT NOT NULL,
    identity    TEXT,
    job_id      BIGINT NOT NULL REFERENCES jobs,
    lease_id    UUID NOT NULL,
    reason      TEXT NOT NULL
);
CREATE INDEX strikes_worker ON strikes (worker_name);

CREATE TABLE quarantined_workers (
    worker_name TEXT PRIMARY KEY,
    since       TIMESTAMPTZ NOT NULL DEFAULT now(),
    reason      TEXT NOT NULL
);
