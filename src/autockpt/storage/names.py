"""The names autockpt gives what it writes, and the size limits it reads with. Imports nothing of autockpt.

Storage owns these because they decide what is ours to list and delete, and what a commit is (the manifest's
presence); the format imports them from here.

One job: the names and limits of what autockpt writes.
"""

from __future__ import annotations

import re
from typing import Any

MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 256 * 2**20
STEP_RE = re.compile(r"^step_(\d{10,})$")
TMP_RE = re.compile(r"^\.tmp-(?:del-)?step_\d{10,}-[0-9a-f]{8}$")


def step_dirname(step: int) -> str:
    """The directory name of the checkpoint of ``step``: ``step_0000000042`` (names sort by step)."""
    return f"step_{step:010d}"


def valid_file_name(name: Any) -> bool:
    """A payload file name we may open: a plain name, no separators, no '..', ending in .safetensors."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 128
        and name.endswith(".safetensors")
        and all(c.isalnum() or c in "._-" for c in name)
        and not name.startswith(".")
    )
