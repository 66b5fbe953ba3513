"""Webhooks: tenants' endpoints, sent their jobs' terminal and paused events as Standard Webhooks (signed,
retried with backoff, from rows written in the transition's transaction)."""
