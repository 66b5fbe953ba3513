"""/v1/chat/completions: OpenAI chat requests routed to the inference server."""
