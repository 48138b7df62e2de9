"""Ready workloads and entrypoints for cedana-ray jobs."""
