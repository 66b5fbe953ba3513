"""phitune API process (never imports torch)."""
