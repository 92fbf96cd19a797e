"""Rate limits: token buckets in Redis, per account (requests and tokens) and per IP."""
