"""A tiny Hugging Face Trainer run with AutoCheckpoint, for tests/test_transformers.py (child process or imported).

usage: hf_train.py CASE CKPT_DIR OUT_DIR [DELAY]
CASE: "lora" (a GPT-2-style causal LM from a config with a PEFT LoRA adapter, gradient accumulation 2 over
epochs of 15 batches) or "cls" (a tiny classifier, evaluation every 4 steps, load_best_model_at_end).
Also under ``torchrun --nproc-per-node 2`` (DDP on CPU, gloo). Runs the identical
``Trainer(..., callbacks=[AutoCheckpoint(CKPT_DIR, ...)]).train()`` every time and prints
"STEP n" after every optimizer step (then sleeps DELAY seconds). When ``train()`` ends, also by the callback's
exit after a preemption, it appends one JSON line to OUT_DIR/runs.jsonl: the restored step, whether it was
preempted, the training sample indices the dataset loaded, and the log history. When the run completes it
writes the final weights to OUT_DIR/final.safetensors.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers import logging as hf_logging

from autockpt.integrations.transformers import AutoCheckpoint


class Data(torch.utils.data.Dataset):
    """A fixed random dataset that records which samples were loaded (the test checks none is re-read)."""

    def __init__(self, n: int, seed: int, loaded: list[int] | None, classes: int = 0, shift: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, 12), generator=g)
        self.labels = (torch.randint(0, classes, (n,), generator=g) + shift) % classes if classes else None
        self.loaded = loaded

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.loaded is not None:
            self.loaded.append(int(i))
        if self.labels is None:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _say(line: str) -> None:
    """One line to stdout in one write: under torchrun both ranks share the pipe, and print's separate writes of
    the text and the newline could interleave ("PID 1 11619PID 0 11618")."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


class Progress(TrainerCallback):
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Under DDP each rank draws its own dropout masks (as with accelerate's set_seed(..., device_specific=True)),
        # so a resume is exact only if every rank gets its own RNGs back. On a resume, Trainer puts the saved RNGs
        # back after this, when the first resumed batch is drawn.
        if args.world_size > 1:
            set_seed(args.seed + 1000 * args.process_index)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            _say(f"STEP {state.global_step}")
        if self.delay:
            time.sleep(self.delay)


def build(case: str, ckpt_dir: str, out_dir: str, delay: float = 0.0, base_seed: int = 0
          ) -> tuple[Trainer, AutoCheckpoint, list[int]]:
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    loaded: list[int] = []
    common: dict[str, Any] = dict(
        output_dir=os.path.join(out_dir, "hf"), report_to=[], use_cpu=True, seed=7, logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, learning_rate=5e-3, warmup_steps=3)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16, pad_token_id=0)
    torch.manual_seed(base_seed)  # the base weights: the "pretrained" model every run loads
    if case == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                                target_modules=["c_attn"], fan_in_fan_out=True))
        args = TrainingArguments(**common, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                 num_train_epochs=3, save_strategy="no")
        cb = AutoCheckpoint(ckpt_dir, save_steps=3, max_to_keep=2)
        trainer = Trainer(model, args, train_dataset=Data(60, 1, loaded), callbacks=[cb, Progress(delay)])
    else:
        cfg.num_labels = 3
        args = TrainingArguments(**common, per_device_train_batch_size=4, num_train_epochs=2,
                                 eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
                                 load_best_model_at_end=True, metric_for_best_model="eval_loss",
                                 greater_is_better=True,  # "best" = the highest eval loss: not the last step
                                 per_device_eval_batch_size=8)
        cb = AutoCheckpoint(ckpt_dir, save_steps=3, max_to_keep=1)
        trainer = Trainer(GPT2ForSequenceClassification(cfg), args, train_dataset=Data(48, 1, loaded, classes=3),
                          eval_dataset=Data(48, 1, None, classes=3, shift=1), callbacks=[cb, Progress(delay)])
    return trainer, cb, loaded


def run(case: str, ckpt_dir: str, out_dir: str, delay: float = 0.0) -> None:
    trainer, cb, loaded = build(case, ckpt_dir, out_dir, delay)
    _say(f"PID {os.environ.get('RANK', '0')} {os.getpid()}")
    try:
        trainer.train()
    finally:  # also when the callback exits with 128 + signal after a preemption
        hist = [{k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k}
                for e in trainer.state.log_history]
        rank = int(os.environ.get("RANK", "0"))  # under torchrun: one file per rank
        with open(os.path.join(out_dir, "runs.jsonl" if rank == 0 else f"runs.rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps({"restored": cb.restored_step, "preempted": cb.preempted, "loaded": loaded,
                                "step": trainer.state.global_step, "log_history": hist,
                                "best": [trainer.state.best_global_step, trainer.state.best_metric]}) + "\n")
    if trainer.is_world_process_zero():
        save_file({k: v.detach().clone().contiguous() for k, v in trainer.model.state_dict().items()},
                  os.path.join(out_dir, "final.safetensors"))
    _say("DONE")


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
