"""The version of autockpt, in a module of its own so that low layers can read it. Imports nothing.

One job: the version string.
"""

__version__ = "0.1.0"
