"""Persistence: the Redis store (key schema), connections to Redis and the embedded server."""
