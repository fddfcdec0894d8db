-- Issue 16 rule 4. Who handed a result in: the connection (workers.id) and certificate identity
-- that completed the lease. A WVG's lease is completed by the prover it pushed to, a late result
-- by the holder of the expired lease (not the holder of the job's newer one). Strikes land on
-- them.
ALTER TABLE leases ADD COLUMN completed_by TEXT, ADD COLUMN completed_identity TEXT;

-- The certificate identity the strikes that quarantined a worker name came from (NULL without TLS).
ALTER TABLE quarantined_workers ADD COLUMN identity TEXT;

-- Worker names an operator drained (Admin.DrainWorker): a reconnect under the name, or a
-- scheduler restart, finds the worker drained again. Admin.ReleaseWorker lifts it. A worker's
-- own drain (its graceful shutdown) is not kept: it ends with the process.
CREATE TABLE drained_workers (
    worker_name TEXT PRIMARY KEY,
    since       TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The identity the drained connections had (NULL without TLS); who drained it is in audit_log.
    identity    TEXT
);
