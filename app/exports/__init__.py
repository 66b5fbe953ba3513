"""Merged-model exports: a job's adapter folded into its base model by a worker, downloaded as a tar."""
