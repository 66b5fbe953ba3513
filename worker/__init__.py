"""The training side of phitune: data preparation and the LoRA recipe the Celery worker runs."""
