"""Load every checkpoint of a damaged corpus the way a user would, under watch (a test helper).

usage: fault_hostile_load.py CASES_JSON RESULTS_JSON

CASES_JSON lists {"kind", "dir", "clean"}: ``dir`` holds step 1 (intact) and step 2 (damaged); ``clean`` is an
undamaged copy of the same run. For each case this process:

- reads the clean copy first (outside the watch) to know what steps 1 and 2 hold;
- then, watched by an audit hook that records every file or directory the process opens or lists, calls
  ``autockpt.load(dir, step=2)``, ``CheckpointManager(dir).restore(target, step=2)`` and
  ``CheckpointManager(dir).restore(target)`` into a freshly built torch model and optimizer.

The address space is capped (RLIMIT_AS: what the process has mapped after its imports plus 1 GiB), so a
checkpoint that makes autockpt allocate what a lying header claims fails with MemoryError. Results (error
types, whether the target changed, what was restored, warnings, paths touched outside the case directory)
are written as JSON for the test to judge.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from typing import Any

import numpy as np
import torch

import autockpt
from autockpt.errors import AutockptError

cases_file, results_file = sys.argv[1], sys.argv[2]
cases = json.load(open(cases_file))

CODE_ROOTS = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)} | {
    os.path.realpath(os.path.join(os.path.dirname(autockpt.__file__), ".."))})
watch_root: str | None = None
touched: list[str] = []


def hook(event: str, args: tuple[Any, ...]) -> None:
    if watch_root is None or event not in ("open", "os.listdir", "os.scandir", "os.rename", "os.remove",
                                           "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate"):
        return
    path = args[0] if args else None
    if isinstance(path, int) or path is None:
        return
    try:
        raw = os.fsdecode(os.fspath(path))
        if not os.path.isabs(raw) and os.sep not in raw and raw not in (".", ".."):
            return  # a plain name opened relative to a directory descriptor (openat), whose open was watched
        p = os.path.join(os.path.realpath(os.path.dirname(raw)), os.path.basename(raw))  # the link, not its target
    except (TypeError, ValueError):
        return
    if p == watch_root or p.startswith(watch_root + os.sep):
        return
    if p.startswith(CODE_ROOTS) or p.startswith("/proc/") or p.startswith("/dev/"):
        return  # the interpreter importing its own code, or reading about itself
    touched.append(f"{event} {p}")


sys.addaudithook(hook)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


records = Records()
logging.getLogger("autockpt").addHandler(records)


def build() -> dict[str, Any]:
    torch.manual_seed(99)  # deliberately different from the run that wrote the corpus
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 6)).sum().backward()
    opt.step()
    return {"model": model, "opt": opt, "meta": {}}


def flat(state: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every tensor of a target (model parameters and optimizer state) as numpy, by name."""
    out = {f"model/{k}": v.detach().clone().numpy() for k, v in state["model"].state_dict().items()}
    for pid, s in state["opt"].state_dict()["state"].items():
        for k, v in s.items():
            out[f"opt/{pid}/{k}"] = (v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)).numpy()
    return out


def loaded_flat(loaded: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {f"model/{k}": np.asarray(v) for k, v in loaded["model"].items()}
    for pid, s in loaded["opt"]["state"].items():
        for k, v in s.items():
            out[f"opt/{pid}/{k}"] = np.asarray(v)
    return out


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes() for k in a)


def outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except AutockptError as e:
        return f"typed:{type(e).__name__}", None
    except BaseException as e:  # anything else is a failure the test reports
        return f"untyped:{type(e).__name__}: {e}", None


vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.RLIM_INFINITY))

if cases:  # warm up: torch creates its caches and imports its lazy modules at the first restore
    autockpt.CheckpointManager(cases[0]["clean"]).restore(build())


def check_case(case: dict[str, Any]) -> dict[str, Any]:
    global watch_root
    step1 = loaded_flat(autockpt.load(case["clean"], step=1))
    step2 = loaded_flat(autockpt.load(case["clean"], step=2))
    records.messages.clear()
    touched.clear()
    watch_root = os.path.realpath(case["dir"])
    res: dict[str, Any] = {"kind": case["kind"]}

    res["load"], got = outcome(lambda: autockpt.load(case["dir"], step=2))
    if got is not None:
        res["load_same_as_clean"] = same(loaded_flat(got), step2)

    target = build()
    before = flat(target)
    res["restore_step"], _ = outcome(lambda: autockpt.CheckpointManager(case["dir"]).restore(target, step=2))
    res["restore_step_untouched"] = same(flat(target), before)

    target = build()
    warned_before = len(records.messages)
    res["restore_newest"], step = outcome(lambda: autockpt.CheckpointManager(case["dir"]).restore(target))
    res["restored"] = step
    res["restored_is_step1"] = same(flat(target), step1)
    res["restored_is_step2"] = same(flat(target), step2)
    res["warned_about_step2"] = any("step_0000000002" in m for m in records.messages[warned_before:])
    res["listing"], committed = outcome(lambda: autockpt.CheckpointManager(case["dir"]).all_steps())
    res["committed"] = committed or []
    watch_root = None
    res["touched_outside"] = list(touched)

    return res


results = [check_case(case) for case in cases]
json.dump(results, open(results_file, "w"))
