"""phitune's launcher: the `phitune` command, which composes the API, the worker and the inference server."""
