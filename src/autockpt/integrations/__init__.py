"""Framework integrations. Each module imports its framework itself; ``import autockpt`` never does."""
