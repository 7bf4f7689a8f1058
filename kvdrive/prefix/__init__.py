"""The prefix pool: KV of repeated prompt prefixes, reused across requests and restarts."""
