"""Trainer's own checkpointing vs autockpt's AutoCheckpoint on the same LoRA fine-tune (ratios in one run).

    PYTHONPATH=src python benchmarks/hf_trainer.py [--rounds 3] [--layers 4] [--width 256]

The same Trainer run (a GPT-2-style causal LM built from a config, a PEFT LoRA adapter on the attention, AdamW,
a checkpoint every 10 steps) once with Trainer's own checkpointing (``save_strategy="steps"``,
``save_total_limit=2``, then ``train(resume_from_checkpoint=True)``) and once with
``AutoCheckpoint(save_steps=10, max_to_keep=2)`` (``save_strategy="no"``, then the same ``train()``). Measured:
time per save (inside Trainer's ``_save_checkpoint``, which both go through), bytes per save (the checkpoint
directory; for autockpt its step directory plus the deduplicated packs that step wrote), and time to the first
step after resuming mid-epoch (from the ``train()`` call to the first
``on_step_begin``, in a new Trainer in this process). Medians over alternating rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers import logging as hf_logging

from autockpt.integrations.transformers import AutoCheckpoint

SAVE_EVERY = 10


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (n, 32), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class FirstStep(TrainerCallback):
    def __init__(self) -> None:
        self.at: float | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.at is None:
            self.at = time.perf_counter()


def make(kind: str, work: Path, a: argparse.Namespace, max_steps: int) -> tuple[Trainer, FirstStep, list[float]]:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=a.layers, n_head=4, n_embd=a.width, vocab_size=a.vocab, n_positions=64)
    model = get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True))
    common: dict[str, Any] = dict(output_dir=str(work / "hf"), report_to=[], use_cpu=True, seed=0,
                                  per_device_train_batch_size=4, max_steps=max_steps, disable_tqdm=True,
                                  logging_steps=SAVE_EVERY)
    first = FirstStep()
    if kind == "trainer":
        args = TrainingArguments(**common, save_strategy="steps", save_steps=SAVE_EVERY, save_total_limit=2)
        callbacks: list[Any] = [first]
    else:
        args = TrainingArguments(**common, save_strategy="no")
        callbacks = [AutoCheckpoint(str(work / "ckpt"), save_steps=SAVE_EVERY, max_to_keep=2), first]
    trainer = Trainer(model, args, train_dataset=Data(a.samples, a.vocab), callbacks=callbacks)
    times: list[float] = []
    save = trainer._save_checkpoint  # both kinds save through here (AutoCheckpoint replaces it on the instance)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return save(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - t0)

    trainer._save_checkpoint = timed  # type: ignore[method-assign]
    return trainer, first, times


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def one_round(kind: str, a: argparse.Namespace) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix=f"hfbench-{kind}-"))
    try:
        trainer, _, times = make(kind, work, a, a.steps)
        trainer.train()
        if kind == "trainer":
            ckpts = sorted((work / "hf").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        else:
            ckpts = sorted((work / "ckpt").glob("step_*"))
        size = dir_bytes(ckpts[-1])
        if kind == "autockpt":  # with dedup (the default) the tensors new at a step lie in blobs/STEP-*.safetensors
            size += sum(f.stat().st_size for f in (work / "ckpt" / "blobs").glob(f"{ckpts[-1].name}-*"))
        # resume mid-epoch from the newest checkpoint, in a new Trainer (same process: no import time)
        trainer, first, _ = make(kind, work, a, a.steps + SAVE_EVERY)
        t0 = time.perf_counter()
        if kind == "trainer":
            trainer.train(resume_from_checkpoint=True)
        else:
            trainer.train()
        assert first.at is not None
        return {"save_s": statistics.median(times), "bytes": size, "first_step_s": first.at - t0}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3 * SAVE_EVERY)
    ap.add_argument("--samples", type=int, default=400, help="a mid-epoch resume: more than steps x 4")
    a = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    hf_logging.set_verbosity_error()
    res: dict[str, list[dict[str, float]]] = {"trainer": [], "autockpt": []}
    for r in range(a.rounds):
        for kind in (("trainer", "autockpt") if r % 2 == 0 else ("autockpt", "trainer")):
            res[kind].append(one_round(kind, a))
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in res.items()}
    t, c = med["trainer"], med["autockpt"]
    n_base = sum(p.numel() for p in GPT2LMHeadModel(GPT2Config(n_layer=a.layers, n_head=4, n_embd=a.width,
                                                                 vocab_size=a.vocab, n_positions=64)).parameters())
    print(f"LoRA r=8 on a {n_base / 1e6:.1f} M-parameter GPT-2-style model, AdamW, a save every {SAVE_EVERY} steps, "
          f"{a.steps} steps, medians of {a.rounds} alternating rounds")
    print(f"{'':28} {'Trainer (save_steps)':>22} {'AutoCheckpoint':>16} {'ratio':>7}")
    print(f"{'time per save':28} {t['save_s'] * 1e3:19.1f} ms {c['save_s'] * 1e3:13.1f} ms "
          f"{c['save_s'] / t['save_s']:6.2f}x")
    print(f"{'bytes per save':28} {t['bytes'] / 2**20:18.2f} MiB {c['bytes'] / 2**20:12.2f} MiB "
          f"{c['bytes'] / t['bytes']:6.2f}x")
    print(f"{'time to first step, resumed':28} {t['first_step_s']:20.2f} s {c['first_step_s']:14.2f} s "
          f"{c['first_step_s'] / t['first_step_s']:6.2f}x")


if __name__ == "__main__":
    main()
