-- Tickets (`GET /v1/tickets/{id}`) find the batch that decided a request from its log offset:
-- the batch whose [first_offset, next_offset) holds it. One index entry per batch (per ~250
-- requests), none per request.
CREATE INDEX batches_by_next_offset ON batches (next_offset);
