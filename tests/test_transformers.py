"""AutoCheckpoint for the Hugging Face Trainer: real training in subprocesses, killed with real signals, resumed
exactly with the identical command; the reference (uninterrupted) runs happen in this process."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402
from transformers import Trainer  # noqa: E402

import autockpt  # noqa: E402
from autockpt.errors import InvalidArgumentError, StateMismatchError  # noqa: E402
from autockpt.integrations import transformers as hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "hf_train.py"
FULL = os.environ.get("AUTOCKPT_FULL") == "1"
STEPS = 24  # both cases: lora 3 epochs x 8 updates (15 batches, accumulation 2); cls 2 epochs x 12 batches

_spec = importlib.util.spec_from_file_location("hf_train", SCRIPT)
assert _spec is not None and _spec.loader is not None
hf_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf_train)


def _consumed(case: str, step: int) -> int:
    """Training samples a run has taken after ``step`` optimizer updates."""
    if case == "lora":  # 60 samples, 15 batches of 4, 8 updates per epoch (7 of 2 batches, 1 of 1)
        epochs, updates = divmod(step, 8)
        return epochs * 60 + min(updates * 2, 15) * 4
    return step * 4  # cls: 48 samples, batches of 4, one batch per update


def _runs(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def _keep_torch_threads() -> Any:
    """The in-process runs set torch to one thread (as the child processes do); later test files get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """One uninterrupted run of each case, in this process (no extra interpreter start)."""
    refs = {}
    for case in ("lora", "cls"):
        out = tmp_path_factory.mktemp(f"ref_{case}")
        hf_train.run(case, str(out / "ckpt"), str(out))
        (run,) = _runs(out)
        refs[case] = {"run": run, "weights": load_file(out / "final.safetensors"), "ckpt": out / "ckpt"}
    return refs


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(case: str, tmp: Path, kill: tuple[int, int] | None = None, ddp: str | None = None,
         timeout: float = 240) -> tuple[int, str]:
    """The identical command every time; with ``kill=(signal, step)`` the signal is sent once the child printed
    that step (under DDP, SIGTERM to rank 1, which does not print; SIGKILL to the whole process group). Returns
    (exit code, stderr). ``ddp="torchrun"``: ``torchrun --nproc-per-node 2``; ``ddp="direct"``: the two ranks
    started here with the environment torchrun would give them (one interpreter start less per run)."""
    args = [str(SCRIPT), case, str(tmp / "ckpt"), str(tmp), "0.05" if kill else "0"]
    port = str(_free_port())
    if ddp == "torchrun":
        args = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port, *args]
    ranks = [{}] if ddp != "direct" else [
        {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port} for r in range(2)]
    with open(tmp / "stderr", "w") as err:
        procs: list[subprocess.Popen[str]] = []
        for r, extra in enumerate(ranks):  # one process group: rank 0 leads it
            procs.append(subprocess.Popen(
                [sys.executable, *args], stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL, stderr=err,
                text=True, env={**_env(), **extra}, process_group=0 if r == 0 else procs[0].pid))
        proc = procs[0]
        pids: dict[str, int] = {str(r): p.pid for r, p in enumerate(procs)}
        sent = False
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("PID "):
                    pids[line.split()[1]] = int(line.split()[2])
                if kill is not None and not sent and line.startswith("STEP ") and int(line.split()[1]) >= kill[1]:
                    if ddp and kill[0] == signal.SIGKILL:
                        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: every rank (and torchrun)
                    else:
                        os.kill(pids["1"] if ddp else proc.pid, kill[0])
                    sent = True
            codes = [p.wait(timeout=timeout) for p in procs]
        finally:
            if any(p.poll() is None for p in procs):
                os.killpg(proc.pid, signal.SIGKILL)
                for p in procs:
                    p.wait()
    rc = next((c for c in codes if c != 0), 0)
    return rc, (tmp / "stderr").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_same_as_reference(case: str, tmp: Path, ref: dict[str, Any], seed: int, restored: int | None) -> None:
    final = _runs(tmp)[-1]
    why = f"(case {case}, seed {seed}, resumed from step {restored})"
    assert final["restored"] == restored and final["step"] == STEPS and not final["preempted"], why
    weights = load_file(tmp / "final.safetensors")
    assert weights.keys() == ref["weights"].keys(), why
    different = [k for k in weights if not torch.equal(weights[k], ref["weights"][k])]
    assert not different, f"final weights differ from the uninterrupted run {why}: {different[:5]}"
    # every per-step entry (loss, grad_norm, learning_rate, epoch, eval metrics) is identical; the last entry is
    # the summary of this train() call (its train_loss averages the steps of this call only, as in Trainer)
    assert final["log_history"][:-1] == ref["run"]["log_history"][:-1], f"log history differs {why}"
    assert final["best"] == ref["run"]["best"], why
    # the resumed run loaded exactly the samples after the restored position, and none before it
    skipped = _consumed(case, restored or 0)
    assert len(final["loaded"]) + skipped == len(ref["run"]["loaded"]), f"samples re-read or lost {why}"
    assert final["loaded"] == ref["run"]["loaded"][skipped:], f"data order differs {why}"


KILLS = [("lora", signal.SIGTERM), ("cls", signal.SIGKILL)]
if FULL:
    KILLS += [("lora", signal.SIGKILL), ("cls", signal.SIGTERM)]


@pytest.mark.parametrize("case,sig", KILLS, ids=[f"{c}-{s.name}" for c, s in KILLS])
def test_killed_mid_epoch_then_identical_command_resumes_bit_identically(
        case: str, sig: signal.Signals, seed: int, tmp_path: Path, reference: dict[str, Any]) -> None:
    ref = reference[case]
    at = random.Random(seed).randrange(2, STEPS - 3)
    why = f"(case {case}, {sig.name} after step {at}, seed {seed})"
    rc, err = _run(case, tmp_path, kill=(sig, at))
    steps = autockpt.CheckpointManager(str(tmp_path / "ckpt")).all_steps()  # none if killed before the 1st save
    if sig == signal.SIGTERM:
        (first,) = _runs(tmp_path)
        assert rc == 143 and first["preempted"], f"exit code {rc} {why}: {err[-2000:]}"
        saved = first["step"]
        assert saved >= at and max(steps) == saved, why
        assert f"autockpt: SIGTERM: saved step {saved} to {tmp_path / 'ckpt'}; stopping (exit code 143)" in err, why
        assert first["log_history"][:-1] == ref["run"]["log_history"][:len(first["log_history"]) - 1], why
    else:
        assert rc == -signal.SIGKILL, f"exit code {rc} {why}"
    restored = max(steps) if steps else None
    rc, err = _run(case, tmp_path)
    assert rc == 0, f"the resumed run failed {why}: {err[-3000:]}"
    _check_same_as_reference(case, tmp_path, ref, seed, restored)


# By default the two ranks are started directly (torchrun's environment, without its launcher process). Three
# launches of two ranks; each rank spends ~13 s of CPU importing torch/transformers/peft and ~2 s training, so about
# 40 s on 2 idle cores. AUTOCKPT_FULL=1 adds torchrun itself, with SIGTERM to rank 1 and SIGKILL of the group.
DDP_KILLS = [("direct", signal.SIGTERM)] + ([("torchrun", signal.SIGTERM), ("torchrun", signal.SIGKILL)]
                                           if FULL else [])


@pytest.mark.full
@pytest.mark.parametrize("launch,sig", DDP_KILLS, ids=[f"{la}-{s.name}" for la, s in DDP_KILLS])
def test_ddp_two_processes_killed_then_resume_bit_identically_per_rank(
        launch: str, sig: signal.Signals, seed: int, tmp_path: Path) -> None:
    """2 CPU processes (gloo), each rank seeded apart (its own dropout masks): SIGTERM to rank 1 (both
    ranks save the same step and stop) or SIGKILL of the whole group, then the identical command. Every rank must
    get its own RNGs back: with rank 0's on both, rank 1's dropout after the resume differs and so do the weights."""
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    rc, err = _run("lora", ref_dir, ddp=launch)
    assert rc == 0, err[-3000:]
    at = random.Random(seed).randrange(3, 10)  # 12 steps: 3 epochs of 4 updates per rank; saves every 3
    why = f"(DDP via {launch}, {sig.name} after step {at}, seed {seed})"
    rc, err = _run("lora", run_dir, kill=(sig, at), ddp=launch)
    assert rc != 0, why  # the ranks exit with 143 (or were killed), which torchrun reports as a failure
    steps = autockpt.CheckpointManager(str(run_dir / "ckpt")).all_steps()
    if sig == signal.SIGTERM:
        saved = [_runs(run_dir)[0]["step"],
                 json.loads((run_dir / "runs.rank1.jsonl").read_text().splitlines()[0])["step"]]
        assert saved[0] == saved[1] >= at and max(steps) == saved[0], why
        assert err.count(f"autockpt: SIGTERM: saved step {saved[0]} to") == 2, why
    assert steps, f"no checkpoint before the kill {why}"
    restored = max(steps)
    rngs = autockpt.load(str(run_dir / "ckpt"), restored)["rng"]  # checked after the resume (below)
    rc, err = _run("lora", run_dir, ddp=launch)
    assert rc == 0, f"{why}: {err[-3000:]}"
    ref, got = load_file(ref_dir / "final.safetensors"), load_file(run_dir / "final.safetensors")
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, f"final weights differ from the uninterrupted run {why}: {different[:5]}"
    for name in ("runs.jsonl", "runs.rank1.jsonl"):
        want = json.loads((ref_dir / name).read_text().splitlines()[-1])
        have = json.loads((run_dir / name).read_text().splitlines()[-1])
        assert have["restored"] == restored and have["step"] == want["step"], why
        assert have["log_history"][:-1] == want["log_history"][:-1], f"{name}: log history differs {why}"
        assert have["loaded"] == want["loaded"][len(want["loaded"]) - len(have["loaded"]):], why
    # the checkpoint held one RNG state per rank, and they differ (else this test could not tell them apart)
    assert isinstance(rngs, list) and len(rngs) == 2, f"{type(rngs).__name__} {why}"
    assert not torch.equal(rngs[0]["torch"], rngs[1]["torch"]), why


def test_lora_checkpoint_holds_the_adapter_and_the_base_models_hash(reference: dict[str, Any]) -> None:
    ckpt = reference["lora"]["ckpt"]
    state = autockpt.load(str(ckpt))
    assert state["model"] and all("lora_" in k for k in state["model"]), sorted(state["model"])[:5]
    assert state["frozen"]["tensors"] > 0 and len(state["frozen"]["xxh3_64"]) == 16
    assert state["trainer_state"]["global_step"] == STEPS
    assert not list(ckpt.rglob("*.bin")) and not list(ckpt.rglob("*.pt")) and not list(ckpt.rglob("*.pth"))


def test_best_checkpoint_is_kept_and_loaded_at_end(reference: dict[str, Any]) -> None:
    ref = reference["cls"]
    best, metric = ref["run"]["best"]
    assert 0 < best < STEPS, "the test needs a best step that is not the last one"
    kept = autockpt.CheckpointManager(str(ref["ckpt"])).all_steps()
    assert kept == [best, STEPS], f"max_to_keep=1 plus the best: {kept}"
    best_state = autockpt.load(str(ref["ckpt"]), best)
    assert best_state["trainer_state"]["best_metric"] == metric
    for key, value in best_state["model"].items():  # load_best_model_at_end put the best weights back
        assert torch.equal(ref["weights"][key], value), key


def test_resume_onto_a_different_base_model_raises_before_touching_it(
        tmp_path: Path, reference: dict[str, Any]) -> None:
    shutil.copytree(reference["lora"]["ckpt"], tmp_path / "ckpt")
    trainer, _, _ = hf_train.build("lora", str(tmp_path / "ckpt"), str(tmp_path), base_seed=1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(StateMismatchError, match="frozen parameters"):
        trainer.train()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_preemption_without_exit_returns_from_train(tmp_path: Path) -> None:
    trainer, cb, _ = hf_train.build("lora", str(tmp_path / "ckpt"), str(tmp_path))
    cb.exit_on_preemption = False

    class Signal(hf_train.Progress):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 5:  # during the 6th step
                os.kill(os.getpid(), signal.SIGUSR1)

    trainer.add_callback(Signal(0))
    trainer.train()
    assert cb.preempted and cb.exit_code == 128 + signal.SIGUSR1 and trainer.state.global_step == 6
    assert autockpt.CheckpointManager(str(tmp_path / "ckpt")).all_steps() == [3, 6]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers put back


def test_resume_from_checkpoint_true_works_on_the_first_run(tmp_path: Path) -> None:
    cb = hf.AutoCheckpoint(str(tmp_path / "ckpt"), save_steps=1)
    trainer = _tiny_trainer(tmp_path, callbacks=[cb], save_strategy="no")
    trainer.train(resume_from_checkpoint=True)  # Trainer alone raises "No valid checkpoint found"
    assert cb.restored_step is None and autockpt.CheckpointManager(str(tmp_path / "ckpt")).all_steps() == [1, 2]
    trainer = _tiny_trainer(tmp_path, callbacks=[cb2 := hf.AutoCheckpoint(str(tmp_path / "ckpt"))],
                            save_strategy="no")
    trainer.train(resume_from_checkpoint=True)
    assert cb2.restored_step == 2 and trainer.state.global_step == 2


def test_async_save_commits_every_checkpoint_and_resumes(tmp_path: Path) -> None:
    cb = hf.AutoCheckpoint(str(tmp_path / "ckpt"), save_steps=1, async_save=True, max_to_keep=None)
    trainer = _tiny_trainer(tmp_path, callbacks=[cb], save_strategy="no")
    trainer.train()
    assert autockpt.CheckpointManager(str(tmp_path / "ckpt")).all_steps() == [1, 2]
    want = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    torch.manual_seed(123)  # a different model: the resume must put every trained weight back
    trainer = _tiny_trainer(tmp_path, callbacks=[cb2 := hf.AutoCheckpoint(str(tmp_path / "ckpt"))],
                            save_strategy="no")
    trainer.train()  # finds the run complete (step 2 of 2): restores, trains nothing
    assert cb2.restored_step == 2
    got = trainer.model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("kwargs,needle", [
    ({"directory": ""}, "directory"),
    ({"save_steps": 0}, "save_steps must be a positive int"),
    ({"save_steps": 2.5}, "got 2.5"),
    ({"save_every_seconds": -1}, "save_every_seconds"),
    ({"save_every_seconds": float("nan")}, "save_every_seconds"),
    ({"max_to_keep": 0}, "max_to_keep"),
    ({"keep_every_n_hours": "6"}, "keep_every_n_hours"),
    ({"metric_for_best": ""}, "metric_for_best"),
    ({"greater_is_better": "yes"}, "greater_is_better must be True or False, got 'yes'"),
    ({"keep_best": 0}, "keep_best"),
    ({"async_save": 1}, "async_save"),
    ({"storage_options": "key=x"}, "storage_options"),
    ({"exit_on_preemption": None}, "exit_on_preemption"),
])
def test_bad_arguments_raise_typed_errors(kwargs: dict[str, Any], needle: str) -> None:
    kwargs = {"directory": "runs/x", **kwargs}
    with pytest.raises(InvalidArgumentError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        hf.AutoCheckpoint(**kwargs)


def test_trainer_internals_this_integration_needs_still_exist(tmp_path: Path) -> None:
    """Pins every private Trainer method the callback replaces on the instance, with the arguments it expects."""
    expected = {
        "_save_checkpoint": ["self", "model", "trial"],
        "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
        "_load_optimizer_and_scheduler": ["self", "checkpoint"],
        "_load_scaler": ["self", "checkpoint"],
        "_load_rng_state": ["self", "checkpoint"],
        "_load_best_model": ["self"],
    }
    assert set(expected) == set(hf._TRAINER_METHODS)
    for name, params in expected.items():
        assert list(inspect.signature(getattr(Trainer, name)).parameters) == params, name
    assert "resume_from_checkpoint" in inspect.signature(Trainer.train).parameters
    # on_init_end is called from Trainer.__init__, where the callback finds the Trainer; a plain add_callback
    # (which does not call on_init_end) is refused at train() with a message saying what to do
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, cb, _ = hf_train.build("lora", str(tmp_path / "ckpt"), str(tmp_path))
    assert cb._trainer is trainer and "train" in vars(trainer)
    assert not [w for w in caught if "autockpt" in str(w.message)]  # save_strategy="no": no warning
    late = _tiny_trainer(tmp_path, save_strategy="no")
    late.add_callback(hf.AutoCheckpoint(str(tmp_path / "late")))
    with pytest.raises(InvalidArgumentError, match="callbacks="):
        late.train()


def test_an_optimizer_that_does_not_fit_leaves_the_model_untouched(tmp_path: Path) -> None:
    cb = hf.AutoCheckpoint(str(tmp_path / "ckpt"), save_steps=1)
    _tiny_trainer(tmp_path, callbacks=[cb], save_strategy="no").train()  # AdamW: decay and no-decay groups
    torch.manual_seed(123)
    trainer = _tiny_trainer(tmp_path, callbacks=[hf.AutoCheckpoint(str(tmp_path / "ckpt"))], save_strategy="no",
                            optimizer=lambda model: torch.optim.SGD(model.parameters(), lr=0.1))  # one group
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(StateMismatchError, match="does not fit this optimizer"):
        trainer.train()
    after = trainer.model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []  # not half-restored


def _tiny_trainer(tmp_path: Path, callbacks: list[Any] | None = None, optimizer: Any = None, **args: Any
                  ) -> Trainer:
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8))
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 16, (8, 8))]
    return Trainer(model, TrainingArguments(str(tmp_path / "out"), report_to=[], use_cpu=True, max_steps=2, **args),
                   train_dataset=data, eval_dataset=data, callbacks=callbacks,
                   optimizers=(None if optimizer is None else optimizer(model), None))


@pytest.mark.parametrize("strategy,needle", [("steps", "save_strategy='no'"), ("best", "cancels every save")])
def test_trainer_left_saving_is_told_so(tmp_path: Path, strategy: str, needle: str) -> None:
    extra = {"eval_strategy": "steps", "metric_for_best_model": "loss"} if strategy == "best" else {}
    with pytest.warns(UserWarning, match=needle):
        _tiny_trainer(tmp_path, callbacks=[hf.AutoCheckpoint(str(tmp_path / "ckpt"))], save_strategy=strategy,
                      **extra)
