"""``autockpt``: look at, verify, prune, export and import checkpoints from the command line.

```
autockpt ls URL                      every checkpoint: step, time, size, metrics, status, why it is kept;
                                     then who holds the writer lease and until when
autockpt show URL [--step N]         one manifest in human form: state tree, tensors, metadata
autockpt verify URL [--step N|--all] sizes and checksums; exit status 0 only if all verify
autockpt prune URL --max-to-keep K   apply a retention policy offline (--dry-run deletes nothing)
autockpt export URL --to FILE        a plain state dict: .safetensors or .pt (tensors only)
autockpt materialize URL --step N --to DIR   a self-contained copy of one checkpoint (no shared packs)
autockpt import FILE --to URL --step N   a safetensors / torch / Lightning / Keras file as a checkpoint
```

Every URL is an fsspec URL; options for its filesystem come from ``--storage-option KEY=VALUE`` (repeatable;
a dotted key nests, e.g. ``client_kwargs.endpoint_url=http://...``; a value that parses as JSON is taken as
JSON, so ``anon=true`` is a bool) and/or ``--storage-options '{"json": "object"}'``.

Exit status: 0 success; 1 a checkpoint failed verification (or is damaged); 2 a bad argument, a missing
directory, checkpoint or file, a path that is a file, missing credentials, or a value that cannot be stored.
Errors are one line on standard error.

One job: the admin commands and their output. Imports ``autockpt.convert``, ``errors``, ``options``,
``progress``, ``reader``, ``payload``, ``format``, ``_version``, ``collect``, ``lease``, ``retention``,
``storage`` and (for ``import``) ``autockpt.manager``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from autockpt._version import __version__
from autockpt.collect import PACK_FORMAT, collect
from autockpt.convert import ConversionError, flatten_tensors, read_foreign, write_tensors
from autockpt.errors import (
    AutockptError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
)
from autockpt.format import TensorEntry, dump_manifest
from autockpt.lease import WriterLease, current_lease, describe
from autockpt.options import ManagerOptions
from autockpt.payload import write_payload
from autockpt.progress import format_bytes
from autockpt.reader import check_sizes, open_checkpoint, read_manifest, referenced_bytes
from autockpt.retention import CheckpointInfo, KeepBest, RetentionPolicy
from autockpt.storage import BLOBS_DIR, Storage, TieredStorage, access_problem, open_storage, step_dirname

EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_USAGE = 2

_PROG = "autockpt"


class CliError(Exception):
    """A problem to report in one line, with an exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------ options


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def storage_options_from(pairs: Sequence[str], json_text: str | None) -> dict[str, Any]:
    """Build fsspec storage options from ``KEY=VALUE`` pairs (dotted keys nest) and an optional JSON object."""
    opts: dict[str, Any] = {}
    if json_text:
        try:
            loaded = json.loads(json_text)
        except ValueError as e:
            raise CliError(
                f"--storage-options is not valid JSON ({e}); give an object like '{{\"anon\": true}}'"
            ) from None
        if not isinstance(loaded, dict):
            raise CliError("--storage-options must be a JSON object, like '{\"anon\": true}'")
        opts.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise CliError(f"--storage-option {pair!r} is not KEY=VALUE; e.g. --storage-option anon=true")
        node = opts
        *parents, leaf = key.split(".")
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise CliError(f"--storage-option {pair!r}: {p!r} already has a non-object value")
            node = child
        node[leaf] = _parse_value(value)
    return opts


def _keep_best(text: str) -> KeepBest:
    """``METRIC[:min|max[:K]]`` -> KeepBest."""
    parts = text.split(":")
    if not parts[0] or len(parts) > 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not METRIC[:min|max[:K]], e.g. val_loss:min:2")
    mode = parts[1] if len(parts) > 1 else "min"
    try:
        k = int(parts[2]) if len(parts) > 2 else 1
        return KeepBest(parts[0], mode, k)  # type: ignore[arg-type]
    except (ValueError, InvalidArgumentError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return v


def _step(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step (an integer >= 0)")
    return v


def _hours(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of hours")
    return v


# ------------------------------------------------------------------------------------------------ helpers


def _open_storage(args: argparse.Namespace, url: str | None = None) -> Storage:
    """The checkpoint directory named on the command line; CliError if it does not exist."""
    url = url if url is not None else args.url
    opts = storage_options_from(args.storage_option, args.storage_options)
    try:
        storage = open_storage(url, opts, getattr(args, "local_dir", None))
    except (ValueError, ImportError, TypeError) as e:
        raise CliError(f"cannot open {url!r}: {e}") from None
    if storage.root_is_file():
        raise CliError(f"{url} is a file, not a checkpoint directory: give the directory that holds the step_* "
                       "directories")
    if not storage.root_exists():
        raise CliError(f"no checkpoint directory at {url}: it does not exist. Check the path or URL "
                       "(and --storage-option for credentials or an endpoint).")
    return storage


def _committed(storage: Storage) -> list[int]:
    steps = sorted(storage.scan().committed)
    if not steps:
        raise CliError(f"no committed checkpoints in {storage.url} (run `{_PROG} ls {storage.url}` to see what "
                       "is there)")
    return steps


def _pick_step(storage: Storage, step: int | None) -> int:
    steps = _committed(storage)
    if step is None:
        return steps[-1]
    if step not in steps:
        shown = ", ".join(map(str, steps[-10:]))
        raise CliError(f"no committed checkpoint at step {step} in {storage.url}; steps there: {shown}")
    return step


def _fmt_time(t: Any) -> str:
    if not isinstance(t, (int, float)):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _fmt_metrics(metrics: Any) -> str:
    if not isinstance(metrics, dict) or not metrics:
        return "-"
    return " ".join(f"{k}={v:.6g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in metrics.items())


def _payload_size(manifest: dict[str, Any]) -> int:
    """The bytes of every tensor the checkpoint refers to, wherever they lie."""
    return referenced_bytes(manifest)


def _pack_step(pack: str) -> int | None:
    """The step whose save wrote a pack (packs are named ``step_N-...``)."""
    found = re.match(r"step_(\d+)-", pack)
    return int(found.group(1)) if found else None


def _added_size(step: int, manifest: dict[str, Any]) -> int:
    """The bytes this checkpoint's save wrote: its own files and the packs it wrote (not what it shares)."""
    own = sum(int(f["size"]) for f in manifest["files"].values())
    return own + sum(int(b["size"]) for n, b in manifest.get("blobs", {}).items() if _pack_step(n) == step)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(out)


def _policy(args: argparse.Namespace) -> RetentionPolicy:
    try:
        return ManagerOptions(args.max_to_keep, args.keep_every_n_hours, args.keep_best).policy
    except InvalidArgumentError as e:
        raise CliError(str(e)) from None


def _infos(storage: Storage, steps: Sequence[int]) -> tuple[list[CheckpointInfo], dict[int, Any]]:
    """Retention info of each step whose manifest reads, and step -> manifest or the error reading it."""
    infos: list[CheckpointInfo] = []
    manifests: dict[int, Any] = {}
    for step in steps:
        try:
            m = read_manifest(storage, step)
        except (CorruptCheckpointError, CheckpointNotFoundError) as e:
            manifests[step] = e
            continue
        manifests[step] = m
        infos.append(CheckpointInfo.from_manifest(m))
    return infos, manifests


def _recorded_policy(manifests: dict[int, Any]) -> RetentionPolicy | None:
    """The retention policy recorded in the newest manifest that reads; None if it has none (older autockpt)."""
    for step in sorted(manifests, reverse=True):
        if isinstance(manifests[step], dict):
            return RetentionPolicy.from_json(manifests[step].get("retention"))
    return None


def _sizes_ok(storage: Storage, step: int, manifest: dict[str, Any]) -> str | None:
    """None if every payload file has its recorded size, else what is wrong."""
    try:
        check_sizes(storage, step, manifest)
    except CorruptCheckpointError as e:
        return str(e)
    return None


# ------------------------------------------------------------------------------------------------ ls


def _leftover_step(name: str) -> str:
    found = re.search(r"step_(\d+)", name)
    return str(int(found.group(1))) if found else "?"


def cmd_ls(args: argparse.Namespace) -> int:
    storage = _open_storage(args)
    listing = storage.scan()
    steps = sorted(listing.committed)
    infos, manifests = _infos(storage, steps)
    explicit = args.max_to_keep is not None or args.keep_every_n_hours is not None or args.keep_best is not None
    recorded = None if explicit else _recorded_policy(manifests)
    if args.max_to_keep is None:
        args.max_to_keep = 1
    reasons = (recorded or _policy(args)).reasons(infos)
    explicit = explicit or recorded is not None
    rows = [["STEP", "CREATED (UTC)", "SIZE", "ADDED", "METRICS", "STATUS", "KEPT"]]
    tiers: dict[int, str] = {}
    if isinstance(storage, TieredStorage):  # --local-dir: where each step is
        lease = WriterLease(storage)
        tiers = storage.where(uploading=lease.live_other(lease.read()))
        rows[0].append("WHERE")
    bad = False
    for step in steps:
        m = manifests[step]
        if isinstance(m, Exception):
            rows.append([str(step), "?", "?", "?", "-", f"DAMAGED: {m}", "-"]
                        + ([tiers.get(step, "?")] if tiers else []))
            bad = True
            continue
        if args.verify:
            try:
                open_checkpoint(storage, step, m).close()
                status = "verified"
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                status, bad = f"DAMAGED: {e}", True
        else:
            problem = _sizes_ok(storage, step, m)
            status = "committed" if problem is None else f"DAMAGED: {problem}"
            bad = bad or problem is not None
        kept = ",".join(reasons.get(step, [])) or ("prunable" if explicit else "-")
        rows.append([str(step), _fmt_time(m.get("created")), format_bytes(_payload_size(m)),
                     format_bytes(_added_size(step, m)), _fmt_metrics(m.get("metrics")), status, kept]
                    + ([tiers.get(step, "?")] if tiers else []))
    more = ["-"] if tiers else []
    for name in sorted(listing.uncommitted):
        rows.append([_leftover_step(name), "-", "-", "-", "-",
                     f"uncommitted: {name} has no manifest (an interrupted save)", "-", *more])
    for name in sorted(listing.temporary):
        kind = "being deleted" if name.startswith(".tmp-del-") else "an interrupted save, or one in progress"
        rows.append([_leftover_step(name), "-", "-", "-", "-", f"temporary: {name} ({kind})", "-", *more])
    if len(rows) == 1:
        print(f"no checkpoints in {storage.url}")
    else:
        print(_table(rows))
    print(_lease_line(storage))
    return EXIT_DAMAGED if bad else EXIT_OK


def _lease_line(storage: Storage) -> str:
    """Who holds the writer lease and until when."""
    cur = current_lease(storage)
    if cur is None:
        return "writer lease: none (no writer has started here)"
    gen, lease = cur
    if lease is None:
        return f"writer lease: generation {gen}, unreadable"
    return f"writer lease: generation {gen}, {describe(lease)}"


# ------------------------------------------------------------------------------------------------ show


def cmd_sync(args: argparse.Namespace) -> int:
    opts = storage_options_from(args.storage_option, args.storage_options)
    if not os.path.isdir(args.local_dir):
        raise CliError(f"no local directory at {args.local_dir}")
    storage = open_storage(args.remote_url, opts, args.local_dir, pack_format=PACK_FORMAT)
    assert isinstance(storage, TieredStorage)
    lease = WriterLease(storage)
    lease.acquire()  # the only writer of the remote meanwhile: a running job would be refused, and vice versa
    try:
        storage.cleanup(storage.scan())  # queues every local step the remote lacks
        backlog = sorted(set(storage.local.scan().committed) - set(storage.remote.scan().committed))
        storage.wait_uploads()
    finally:
        storage.close()
        lease.release()
    print(f"uploaded {len(backlog)} checkpoint(s) to {args.remote_url}: steps {backlog}" if backlog
          else f"nothing to upload: {args.remote_url} holds every checkpoint of {args.local_dir}")
    return EXIT_OK


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _tensor_line(manifest: dict[str, Any], name: str) -> str:
    t = manifest["tensors"].get(name)
    if not isinstance(t, dict):
        return f"tensor {name!r} (not listed in the manifest!)"
    b, e = t.get("offsets", [0, 0])
    line = f"tensor {t.get('dtype')} {_shape_str(t.get('shape', []))} {format_bytes(e - b)}  ({name})"
    if "blob" in t and _pack_step(t["blob"]) != manifest.get("step"):
        line += f"  shared: written by step {_pack_step(t['blob'])}"
    return line


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_tuple_node(node: Any) -> bool:
    return isinstance(node, dict) and node.get("type") == "tuple" and isinstance(node.get("items"), list)


def _is_scalar_node(node: Any) -> bool:
    return node is None or isinstance(node, (bool, int, float, str)) or (
        isinstance(node, dict) and node.get("type") == "float"
    )


def _scalar(node: Any) -> Any:
    return node.get("value") if isinstance(node, dict) else node


def _tree_lines(node: Any, manifest: dict[str, Any], indent: int) -> Iterator[str]:
    """Lines ``key: description`` for the children of a tagged manifest node (a dict/list/tuple)."""
    pad = "  " * indent

    def child(key: str, value: Any) -> Iterator[str]:
        seq = value if isinstance(value, list) else value.get("items") if _is_tuple_node(value) else None
        if isinstance(seq, list) and seq and all(_is_scalar_node(v) for v in seq):
            seq_kind = "list" if isinstance(value, list) else "tuple"
            yield f"{pad}{key}: {seq_kind}[{len(seq)}] {_short([_scalar(v) for v in seq], 60)}"
        elif isinstance(value, list):
            yield f"{pad}{key}: list[{len(value)}]"
            yield from _tree_lines(value, manifest, indent + 1)
        elif isinstance(value, dict):
            kind = value.get("type")
            if kind == "tensor":
                yield f"{pad}{key}: {_tensor_line(manifest, str(value.get('name')))}"
            elif kind == "dict":
                n = len(value.get("items") or value.get("pairs") or [])
                yield f"{pad}{key}: dict[{n}]"
                yield from _tree_lines(value, manifest, indent + 1)
            elif kind == "tuple":
                yield f"{pad}{key}: tuple[{len(value.get('items', []))}]"
                yield from _tree_lines(value, manifest, indent + 1)
            elif kind == "stateful":
                yield f"{pad}{key}: {value.get('class')} (state_dict)"
                inner = value.get("state")
                if isinstance(inner, (dict, list)):
                    yield from _tree_lines(inner, manifest, indent + 1)
            elif kind == "per_rank":
                ranks: list[Any] = value["ranks"] if isinstance(value.get("ranks"), list) else []
                yield f"{pad}{key}: per rank ({len(ranks)} ranks)"
                yield from _tree_lines({f"rank {r}": v for r, v in enumerate(ranks)}, manifest, indent + 1)
            elif kind == "bytes":
                yield f"{pad}{key}: bytes ({len(value.get('b64', '')) * 3 // 4} B)"
            elif kind == "float":
                yield f"{pad}{key}: {value.get('value')}"
            else:
                yield f"{pad}{key}: ? {_short(value)}"
        else:
            yield f"{pad}{key}: {_short(value)}"

    if isinstance(node, list):
        for i, v in enumerate(node):
            yield from child(f"[{i}]", v)
    elif isinstance(node, dict) and node.get("type") == "dict" and isinstance(node.get("items"), dict):
        for k, v in node["items"].items():
            yield from child(str(k), v)
    elif isinstance(node, dict) and node.get("type") == "dict":
        for pair in node.get("pairs", []):
            k, v = pair
            yield from child(_short(k), v)
    elif isinstance(node, dict) and node.get("type") == "tuple":
        for i, v in enumerate(node.get("items", [])):
            yield from child(f"({i})", v)
    elif isinstance(node, dict) and node.get("type") == "stateful":
        yield from _tree_lines(node.get("state"), manifest, indent)
    elif isinstance(node, dict):  # the top-level state: a plain mapping of names to nodes
        for k, v in node.items():
            yield from child(str(k), v)


def cmd_show(args: argparse.Namespace) -> int:
    storage = _open_storage(args)
    step = _pick_step(storage, args.step)
    m = read_manifest(storage, step)
    if args.json:
        print(json.dumps(m, indent=2))
        return EXIT_OK
    ntensors = len(m["tensors"])
    print(f"checkpoint   {storage.path(step_dirname(step))}")
    print(f"step         {step}")
    print(f"created      {_fmt_time(m.get('created'))} UTC")
    print(f"run started  {_fmt_time(m.get('run_start'))} UTC")
    print(f"format       autockpt v{m.get('format_version')}")
    print(f"size         {format_bytes(_payload_size(m))} in {len(m['files'])} file(s), {ntensors} tensor(s)")
    print(f"metrics      {_fmt_metrics(m.get('metrics'))}")
    print(f"metadata     {_short(m.get('metadata', {}), 200)}")
    versions = m.get("versions", {})
    print("versions     " + (" ".join(f"{k}={v}" for k, v in versions.items()) if isinstance(versions, dict) else "?"))
    print("files")
    for fname, info in m["files"].items():
        print(f"  {fname}  {info['size']} B  xxh3_64={info.get('xxh3_64')}")
    if m.get("blobs"):
        shared = [n for n, t in m["tensors"].items() if _pack_step(t.get("blob", "")) != step]
        print(f"packs        {len(m['blobs'])} in {BLOBS_DIR}/, {len(shared)} of {ntensors} tensor(s) shared with "
              f"earlier checkpoints, {format_bytes(_added_size(step, m))} written by this save")
        for pname, info in m["blobs"].items():
            by = _pack_step(pname)
            print(f"  {BLOBS_DIR}/{pname}  {info['size']} B  " + ("new" if by == step else f"shared (step {by})"))
    print("state")
    for line in _tree_lines(m["state"], m, 1):
        print(line)
    print("(manifest only; run `autockpt verify` to check the files' checksums)")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ verify


def cmd_verify(args: argparse.Namespace) -> int:
    storage = _open_storage(args)
    if args.all:
        steps = _committed(storage)
    else:
        steps = [_pick_step(storage, args.step)]
    failed = 0
    for step in steps:
        t0 = time.perf_counter()
        try:
            ckpt = open_checkpoint(storage, step)
        except (CorruptCheckpointError, CheckpointNotFoundError) as e:
            failed += 1
            print(f"step {step}: FAILED: {e}")
            continue
        size = _payload_size(ckpt.manifest)
        ckpt.close()
        packs = f", {len(ckpt.manifest['blobs'])} shared pack(s)" if ckpt.manifest.get("blobs") else ""
        print(f"step {step}: ok ({format_bytes(size)}, {len(ckpt.manifest['files'])} file(s){packs}, "
              f"{len(ckpt.manifest['tensors'])} tensor(s), {time.perf_counter() - t0:.2f} s)")
    if failed:
        print(f"{failed} of {len(steps)} checkpoint(s) failed verification", file=sys.stderr)
        return EXIT_DAMAGED
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ prune


def cmd_prune(args: argparse.Namespace) -> int:
    storage = _open_storage(args)
    policy = _policy(args)
    if args.dry_run:
        return _prune(storage, policy, args)
    lease = WriterLease(storage)
    lease.acquire()  # deletes only as the directory's one writer: beside a running job, LeaseError names it
    try:
        return _prune(storage, policy, args)
    finally:
        lease.release()


def _prune(storage: Storage, policy: RetentionPolicy, args: argparse.Namespace) -> int:
    steps = sorted(storage.scan().committed)
    infos, manifests = _infos(storage, steps)
    reasons = policy.reasons(infos)
    verb = "would delete" if args.dry_run else "deleted"
    deleted = 0
    for step in steps:
        if isinstance(manifests[step], Exception):
            print(f"step {step}: left alone, its manifest does not read: {manifests[step]}")
        elif step in reasons:
            print(f"step {step}: kept ({', '.join(reasons[step])})")
        else:
            if not args.dry_run:
                storage.delete(step)
            deleted += 1
            print(f"step {step}: {verb}")
    print(f"{verb} {deleted} of {len(steps)} checkpoint(s)" + (" (dry run: nothing was deleted)" if args.dry_run
                                                              else ""))
    if not args.dry_run:
        freed = collect(storage)
        if freed:
            print(f"collected {format_bytes(freed)} of shared packs no checkpoint refers to")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ export


def _select(state: dict[str, Any], key: str | None) -> Any:
    if key is None:
        return state
    node: Any = state
    for part in key.split("/"):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            have = ", ".join(map(str, node)) if isinstance(node, dict) else type(node).__name__
            raise CliError(f"--key {key!r}: no {part!r} in the checkpoint's state (it has: {have})")
    return node


def cmd_export(args: argparse.Namespace) -> int:
    dest: str = args.to
    if dest.endswith(".safetensors"):
        kind = "safetensors"
    elif dest.endswith((".pt", ".pth")):
        kind = "pt"
    else:
        raise CliError(f"--to {dest!r}: the file name must end in .safetensors, .pt or .pth")
    storage = _open_storage(args)
    step = _pick_step(storage, args.step)
    with open_checkpoint(storage, step) as ckpt:  # verifies sizes and checksums before anything is written
        tensors, dropped = flatten_tensors(_select(ckpt.state(), args.key))
    if not tensors:
        raise CliError(f"step {step}{' key ' + repr(args.key) if args.key else ''} holds no tensors to export")
    write_tensors(dest, kind, tensors, step)
    if dropped:
        print(f"note: {dropped} non-tensor value(s) were left out of {dest}; "
              f"`{_PROG} show` lists them", file=sys.stderr)
    total = sum(int(getattr(v, "nbytes", 0)) for v in tensors.values())
    print(f"exported {len(tensors)} tensor(s), {format_bytes(total)}, from step {step} to {dest}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ materialize


def materialize(src: Storage, step: int, dst: Storage) -> dict[str, Any]:
    """Write checkpoint ``step`` of ``src`` (verified first) as a self-contained checkpoint of ``dst``: its own
    payload files, no shared packs (format version 1). Returns the new manifest."""
    with open_checkpoint(src, step) as ckpt:
        m = ckpt.manifest
        entries = [TensorEntry(n, ckpt.tensor(n), t.get("framework", "numpy"), t["dtype"], list(t["shape"]))
                   for n, t in m["tensors"].items()]
        with dst.writer(step) as w:
            files, tensors = write_payload(w, entries, 512 * 2**20)
            for n, t in m["tensors"].items():  # shard descriptions and anything else but where the bytes lie
                tensors[n].update({k: v for k, v in t.items() if k not in ("file", "blob", "offsets", "xxh3_128")})
            body = {k: v for k, v in m.items() if k != "blobs"}
            body.update(format_version=1, files=files, tensors=tensors)
            w.commit(dump_manifest(body))
    return body


def cmd_materialize(args: argparse.Namespace) -> int:
    storage = _open_storage(args)
    step = _pick_step(storage, args.step)
    dst = open_storage(args.to, storage_options_from(args.storage_option, args.storage_options))
    if step in dst.scan().committed:
        raise CliError(f"{args.to} already has a checkpoint at step {step}; pick another --to (or delete it first)")
    body = materialize(storage, step, dst)
    print(f"materialized step {step} into {dst.path(step_dirname(step))}: {len(body['tensors'])} tensor(s), "
          f"{format_bytes(referenced_bytes(body))}, self-contained")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ import


def cmd_import(args: argparse.Namespace) -> int:
    src: str = args.file
    if not os.path.isfile(src):
        raise CliError(f"no file {src!r} to import; give the path of a .safetensors, .pt, .ckpt or .weights.h5 file")
    try:
        state, kind = read_foreign(src, args.trust_pickle)
    except ConversionError:
        raise
    except Exception as e:  # a damaged or foreign file: whatever the reading library raised
        raise CliError(f"cannot read {src}: {type(e).__name__}: {e}") from None
    metadata: dict[str, Any] = {"imported_from": os.path.basename(src), "imported_format": kind}
    from autockpt.manager import CheckpointManager

    opts = storage_options_from(args.storage_option, args.storage_options)
    storage = open_storage(args.to, opts)
    if args.step in storage.scan().committed:
        raise CliError(f"{args.to} already has a checkpoint at step {args.step}; pick another --step "
                       f"(or delete it first)")
    with CheckpointManager(args.to, max_to_keep=None, storage_options=opts) as mgr:
        mgr.save(args.step, state, metadata=metadata, force=True)
    manifest = read_manifest(storage, args.step)
    print(f"imported {src} ({metadata['imported_format']}) as step {args.step} in {args.to}: "
          f"{len(manifest['tensors'])} tensor(s), {format_bytes(_payload_size(manifest))}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    """The ``autockpt`` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an fsspec storage option (repeatable); a dotted key nests "
                             "(client_kwargs.endpoint_url=http://...); a JSON value is parsed (anon=true)")
    common.add_argument("--storage-options", metavar="JSON", default=None,
                        help="fsspec storage options as one JSON object (merged under --storage-option)")

    retention = argparse.ArgumentParser(add_help=False)
    retention.add_argument("--keep-every-n-hours", type=_hours, default=None, metavar="H",
                           help="also keep the first checkpoint of every H-hour window of the run")
    retention.add_argument("--keep-best", type=_keep_best, default=None, metavar="METRIC[:min|max[:K]]",
                           help="also keep the K best checkpoints by METRIC (default mode min, K 1)")

    p = argparse.ArgumentParser(prog=_PROG, description="Look at, verify, prune, export and import autockpt "
                                "checkpoints. Exit status: 0 ok, 1 a checkpoint failed verification, 2 a bad "
                                "argument or something missing.")
    p.add_argument("--version", action="version", version=f"autockpt {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what autockpt does (INFO)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("ls", parents=[common, retention], help="list checkpoints",
                       description="List every checkpoint: step, time, size, metrics, status and why a "
                                   "retention policy keeps it (KEPT; 'prunable' if the policy would delete it). "
                                   "The policy is the run's own, as recorded in its newest manifest; retention "
                                   "options replace it (checkpoints written by an older autockpt record none: "
                                   "then only the newest is marked unless options are given). Status checks file "
                                   "sizes; --verify also checks checksums. Exit 1 if one is damaged.")
    s.add_argument("url", help="the checkpoint directory (a path or fsspec URL)")
    s.add_argument("--max-to-keep", type=_positive_int, default=None, metavar="K",
                   help="the K newest are marked 'newest' (default: the run's recorded policy, else 1); any "
                        "retention option replaces the recorded policy")
    s.add_argument("--verify", action="store_true", help="read every checkpoint and check its checksums")
    s.add_argument("--local-dir", default=None, metavar="DIR",
                   help="the run's local tier: also list its copies and show where each step is "
                        "(local, remote, both, uploading)")
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("show", parents=[common], help="one checkpoint's manifest in human form",
                       description="Print one checkpoint's manifest in human form: step, times, size, metrics, "
                                   "metadata, library versions, files with their checksums, and the state tree with "
                                   "each tensor's dtype and shape. Reads the manifest only (no checksums are "
                                   "checked: use verify for that); --json prints it as JSON.")
    s.add_argument("url", help="the checkpoint directory (a path or fsspec URL)")
    s.add_argument("--step", type=_step, default=None, help="default: the newest committed checkpoint")
    s.add_argument("--json", action="store_true", help="print the manifest as JSON")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("verify", parents=[common], help="check sizes and checksums (exit 0 only if all verify)",
                       description="Read a checkpoint (default: the newest committed one; --step N; --all for every "
                                   "one) and check its manifest, every file's size and checksum (xxh3-64 per file, "
                                   "xxh3-128 per tensor in shared packs), and that "
                                   "the safetensors headers agree with the manifest. Prints one line per checkpoint. "
                                   "Exit status: 0 if all verify, 1 if one does not, 2 for a bad argument or a "
                                   "missing directory or step.")
    s.add_argument("url", help="the checkpoint directory (a path or fsspec URL)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--step", type=_step, default=None, help="default: the newest committed checkpoint")
    g.add_argument("--all", action="store_true", help="every committed checkpoint")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("prune", parents=[common, retention], help="apply a retention policy offline",
                       description="Delete the committed checkpoints a retention policy would not keep. "
                                   "Checkpoints whose manifest does not read, leftovers of interrupted saves and "
                                   "anything autockpt did not write are left alone. It takes the directory's writer "
                                   "lease: beside a running job that saves there it refuses (exit 2) and names the "
                                   "job.")
    s.add_argument("url")
    s.add_argument("--max-to-keep", type=_positive_int, required=True, metavar="K", help="keep the K newest")
    s.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("export", parents=[common], help="write a plain state dict (.safetensors or .pt)",
                       description="Write the tensors of a checkpoint (verified first) to a .safetensors file or a "
                                   ".pt file of tensors only (loadable with torch.load(weights_only=True)). Names "
                                   "are the key paths joined with '.', under --key if given. Non-tensor values are "
                                   "left out, with a note.")
    s.add_argument("url")
    s.add_argument("--step", type=_step, default=None, help="default: the newest committed checkpoint")
    s.add_argument("--to", required=True, metavar="FILE", help="model.safetensors or model.pt")
    s.add_argument("--key", default=None, help="export only this sub-tree, e.g. model (nested: model/encoder)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("materialize", parents=[common], help="a self-contained copy of one checkpoint",
                       description="Copy one checkpoint (verified first) into --to DIR as a self-contained checkpoint "
                                   "directory (step_N with its own tensors.safetensors, no shared packs), which "
                                   "autockpt.load and CheckpointManager.restore read like any other.")
    s.add_argument("url")
    s.add_argument("--step", type=_step, default=None, help="default: the newest committed checkpoint")
    s.add_argument("--to", required=True, metavar="DIR", help="the checkpoint directory to write into")
    s.set_defaults(func=cmd_materialize)

    s = sub.add_parser("import", parents=[common], help="bring in a safetensors/torch/Lightning/Keras file",
                       description="Save a .safetensors file, a torch.save state dict (.pt/.pth/.bin), a "
                                   "Lightning .ckpt or a Keras .weights.h5 file as the checkpoint of --step. A "
                                   "state dict becomes {'model': ...}, a Lightning checkpoint {'lightning': ...}. "
                                   "Torch files are read with weights_only=True; one that needs pickle is read only "
                                   "with --trust-pickle.")
    s.add_argument("file")
    s.add_argument("--to", required=True, metavar="URL", help="the checkpoint directory to write into")
    s.add_argument("--step", type=_step, required=True)
    s.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling a .pt/.ckpt file (runs code from the file: only for files you trust)")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("sync", parents=[common], help="upload the checkpoints a local tier holds to its remote",
                       description="Upload every checkpoint of LOCAL_DIR (a run's local_dir) that REMOTE_URL lacks, "
                                   "with the remote commit protocol (for a job that will not restart).")
    s.add_argument("local_dir")
    s.add_argument("remote_url")
    s.set_defaults(func=cmd_sync)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``autockpt`` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as e:
        print(f"{_PROG} {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except CorruptCheckpointError as e:
        print(f"{_PROG} {args.command}: checkpoint damaged: {e}", file=sys.stderr)
        return EXIT_DAMAGED
    except BrokenPipeError:  # `autockpt show URL | head`: the reader went away; that is fine
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except (AutockptError, OSError) as e:
        print(f"{_PROG} {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        why = access_problem(e)  # e.g. no credentials for s3://: one line, not a traceback
        if why is None:
            raise
        print(f"{_PROG} {args.command}: error: cannot read {getattr(args, 'url', '')}: {why}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{_PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
