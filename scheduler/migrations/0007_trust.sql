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
