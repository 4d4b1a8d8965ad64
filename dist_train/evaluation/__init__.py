"""The evaluation pass and the metrics it reports (reduced over every process)."""
