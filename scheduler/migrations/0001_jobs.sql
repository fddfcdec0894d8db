-- Proofmesh job state. The scheduler is the only process that reads or writes these tables.
-- Every transition is one statement guarded by the expected status (and lease id): compare-and-set.

CREATE TABLE batches (
    batch_number      BIGINT PRIMARY KEY,
    protocol_minor    INT NOT NULL,
    protocol_patch    INT NOT NULL,
    -- state_tree_depth, tx_chunk, vm_chunk, storage_chunk, leaf_fan_in, node_fan_in, max_node_depth
    geometry          INT[] NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('proving', 'proven', 'failed')),
    input_key         TEXT NOT NULL,
    proof_key         TEXT,
    priority          INT NOT NULL DEFAULT 0,
    error             TEXT,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at       TIMESTAMPTZ
);

CREATE TABLE jobs (
    id                BIGSERIAL PRIMARY KEY,
    batch_number      BIGINT NOT NULL REFERENCES batches,
    kind              TEXT NOT NULL CHECK (kind IN ('witness_generation', 'proving', 'compression')),
    -- 0..4 the aggregation rounds; 5 compression
    aggregation_round SMALLINT NOT NULL,
    circuit_id        SMALLINT NOT NULL,
    depth             SMALLINT NOT NULL DEFAULT 0,
    sequence_number   INT NOT NULL DEFAULT 0,
    -- waiting: an input is not done; queued: ready to lease; leased; succeeded; failed
    status            TEXT NOT NULL CHECK (status IN ('waiting', 'queued', 'leased', 'succeeded', 'failed')),
    attempts          INT NOT NULL DEFAULT 0,
    max_attempts      INT NOT NULL,
    lease_id          UUID UNIQUE,
    leased_to         TEXT,
    lease_deadline    TIMESTAMPTZ,
    priority          INT NOT NULL DEFAULT 0,
    protocol_minor    INT NOT NULL,
    protocol_patch    INT NOT NULL,
    input_key         TEXT,
    output_key        TEXT,
    error             TEXT,
    compute_secs      DOUBLE PRECISION,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    queued_at         TIMESTAMPTZ,
    leased_at         TIMESTAMPTZ,
    finished_at       TIMESTAMPTZ,
    UNIQUE (batch_number, kind, aggregation_round, circuit_id, depth, sequence_number)
);

-- The lease query: queued jobs of a kind by priority, then batch number.
CREATE INDEX jobs_queue ON jobs (kind, priority DESC, batch_number, id) WHERE status = 'queued';
CREATE INDEX jobs_leased_to ON jobs (leased_to) WHERE status = 'leased';

-- Which jobs feed which: `job_id` becomes queued when every `input_job_id` has succeeded.
CREATE TABLE job_inputs (
    job_id            BIGINT NOT NULL REFERENCES jobs,
    input_job_id      BIGINT NOT NULL REFERENCES jobs,
    position          INT NOT NULL,
    PRIMARY KEY (job_id, input_job_id)
);
CREATE INDEX job_inputs_by_input ON job_inputs (input_job_id);

-- Registrations, for operators: the live connections are in the scheduler's memory.
CREATE TABLE workers (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    role              TEXT NOT NULL,
    zone              TEXT NOT NULL,
    region            TEXT NOT NULL,
    host              TEXT NOT NULL,
    capacity          INT NOT NULL,
    prover_endpoint   TEXT,
    connected_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen         TIMESTAMPTZ NOT NULL DEFAULT now(),
    disconnected_at   TIMESTAMPTZ
);
