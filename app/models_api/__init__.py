"""/v1/models: the configured base models and a tenant's fine-tuned models."""
