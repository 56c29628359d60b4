"""``RNGState``: the global random generators as one stateful object.

One job: the global random generators as one stateful object. Imports only ``autockpt.errors``.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import numpy as np
import xxhash

from autockpt.errors import StateMismatchError


class RNGState:
    """Captures and restores Python's ``random``, NumPy's global generator and torch's CPU and CUDA generators.

    torch's generators are captured when the program has imported torch (autockpt never imports it for you);
    CUDA generators when CUDA is initialised. Put it in the state next to the model:

    ```python
    import autockpt, random
    mgr = autockpt.CheckpointManager("/tmp/rng_demo", max_to_keep=1)
    mgr.save(0, {"rng": autockpt.RNGState()}, force=True)
    a = random.random()
    mgr.restore({"rng": autockpt.RNGState()})
    assert random.random() == a
    ```
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(legacy=False),
        }
        torch = sys.modules.get("torch")
        if torch is not None:
            state["torch"] = torch.get_rng_state()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                state["torch_cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            py = state["python"]
            random.setstate((py[0], tuple(py[1]), py[2]))
            np.random.set_state(state["numpy"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise StateMismatchError(f"RNG state in the checkpoint is malformed: {e!r}") from None
        if "torch" in state:
            import torch

            torch.set_rng_state(state["torch"])
            cuda = state.get("torch_cuda")
            if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)

    def derive_for_rank(self, rank: int) -> None:
        """Reseed every generator from its current state and ``rank``: a stream of its own for a rank that has
        no saved state (a resume on more processes than saved), the same on every run.

        ```python
        import autockpt, random
        rng = autockpt.RNGState()
        saved = rng.state_dict()
        rng.derive_for_rank(3); a = random.random()
        rng.load_state_dict(saved); rng.derive_for_rank(3)
        assert random.random() == a
        ```
        """
        h = xxhash.xxh3_64(repr(random.getstate()).encode())
        h.update(np.random.get_state(legacy=False)["state"]["key"].tobytes())
        torch = sys.modules.get("torch")
        if torch is not None:
            h.update(torch.get_rng_state().numpy().tobytes())
        h.update(f"rank {int(rank)}".encode())
        seed = h.intdigest()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        if torch is not None:
            torch.manual_seed(seed % 2**63)  # CUDA generators too
