"""Framework integrations. Each module imports its framework itself; ``import autockpt`` never does.

One job: hold the integrations, which import nothing of each other. Imports nothing.
"""
