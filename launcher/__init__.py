"""Command line: builds and runs dist-train jobs (train, eval, predict; later launch and submit)."""
