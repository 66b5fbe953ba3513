"""Datasets: streamed multipart upload, JSONL validation, and the OpenAI file objects that describe them."""
