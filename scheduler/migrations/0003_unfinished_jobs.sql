-- Admin.GetQueueDepth and the queue-depth metrics count the unfinished jobs; this keeps that
-- cheap however many finished jobs the table holds.
CREATE INDEX jobs_unfinished ON jobs (aggregation_round, circuit_id, protocol_minor, protocol_patch, kind, status)
    WHERE status IN ('waiting', 'queued', 'leased');
