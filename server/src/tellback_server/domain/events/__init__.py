"""Live events: the event log, the broker that fans it out, and the SSE streams."""
