"""HTTP plumbing shared by every domain: errors, auth, ids, pagination, idempotency."""
