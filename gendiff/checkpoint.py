"""Training checkpoints: everything a run needs to continue bit for bit, written so that a crash never leaves
a half-written checkpoint as the newest, and read without pickle.

A checkpoint at step s is two files in the run's checkpoint folder:
- `ckpt-<s>.safetensors`: every tensor (model, EMA, optimiser moments, RNG states, kept snapshots, …);
- `ckpt-<s>.json`: the step, JSON metadata (optimiser hyperparameters, …) and the sha256 of the tensor file.
Each is written to a temporary name, fsync'ed and renamed (then the folder is fsync'ed); the JSON goes last,
so a checkpoint without its JSON is incomplete and ignored. `latest(folder)` walks back from the newest,
verifies the checksum and falls back to the previous good one with a warning naming the bad file.
Loading uses `safetensors` only: a pickle (or anything else) under a checkpoint name is refused unread.

`save_objects` / `load_objects` checkpoint named state objects (EDM2 CheckpointIO style): anything with
`state_dict()` / `load_state_dict()` whose state is a flat dict of tensors (stored as `<name>.<key>`) and
JSON values (stored in the metadata under `<name>`).
"""
from __future__ import annotations

import glob
import json
import os
import re
import warnings

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .io import file_sha256

_NAME = re.compile(r"ckpt-(\d{8,})\.json$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the run folder is unwritable or full): nothing was left behind."""


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(folder: str, step: int, tensors: dict, meta: dict, keep: int = 3) -> str:
    """Write checkpoint `step` atomically; keep the newest `keep`. Returns the JSON path.
    Raises CheckpointError (with the folder and the OS's reason) if the folder cannot take it."""
    if keep < 1:
        raise ValueError(f"keep={keep} must be >= 1")
    base = os.path.join(folder, f"ckpt-{step:08d}")
    try:
        os.makedirs(folder, exist_ok=True)
        _write_atomic(base + ".safetensors",
                      lambda p: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, p))
        record = {"step": int(step), "sha256": file_sha256(base + ".safetensors"), "meta": meta}
        _write_atomic(base + ".json", lambda p: open(p, "w").write(json.dumps(record)))
        _fsync_dir(folder)
    except (OSError, SafetensorError) as e:
        for ext in (".json", ".safetensors"):  # a partial new checkpoint must not shadow the previous one
            if os.path.exists(base + ext) and not _complete(base):
                os.remove(base + ext)
        raise CheckpointError(f"could not write checkpoint {base}.* in {folder!r}: {e}") from e
    # checkpoints past this step belong to an abandoned timeline (the run resumed from an earlier one because
    # they failed their checksum): they go, so they can neither shadow nor crowd out the one just written
    stale = [s for s in steps(folder) if s > step]
    kept = [s for s in steps(folder) if s <= step]
    for old in stale + kept[:-keep]:
        for ext in (".json", ".safetensors"):
            path = os.path.join(folder, f"ckpt-{old:08d}{ext}")
            if os.path.exists(path):
                os.remove(path)
    return base + ".json"


def _complete(base: str) -> bool:
    try:
        with open(base + ".json") as f:
            return file_sha256(base + ".safetensors") == json.load(f)["sha256"]
    except (OSError, ValueError, KeyError):
        return False


def steps(folder: str) -> list:
    """Steps that have a checkpoint JSON, ascending."""
    return sorted(int(m.group(1)) for p in glob.glob(os.path.join(folder, "ckpt-*.json"))
                  if (m := _NAME.search(os.path.basename(p))))


def load(json_path: str):
    """(step, tensors, meta) of one checkpoint, verified; ValueError if truncated, corrupted or not
    safetensors."""
    base = json_path[: -len(".json")]
    try:
        with open(json_path) as f:
            record = json.load(f)
        expected = record["sha256"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {json_path!r} is unreadable ({e})") from e
    try:
        actual = file_sha256(base + ".safetensors")
    except OSError as e:
        raise ValueError(f"checkpoint {base}.safetensors is missing ({e})") from e
    if actual != expected:
        raise ValueError(f"checkpoint {base}.safetensors fails its checksum (sha256 {actual[:12]}…, "
                         f"recorded {expected[:12]}…): truncated or corrupted")
    try:
        tensors = load_file(base + ".safetensors")   # safetensors only: never unpickles
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {base}.safetensors is not a safetensors file ({e}); "
                         "refusing to load it") from e
    return int(record["step"]), tensors, record.get("meta", {})


def latest(folder: str):
    """The newest checkpoint that verifies, as (step, tensors, meta), or None. Each bad one met on the way
    is reported with a warning naming it and why, and skipped."""
    for step in reversed(steps(folder)):
        path = os.path.join(folder, f"ckpt-{step:08d}.json")
        try:
            return load(path)
        except ValueError as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint", RuntimeWarning, stacklevel=2)
    return None


# ---- named state objects -------------------------------------------------------------------------------

def save_objects(folder: str, step: int, objects: dict, keep: int = 3) -> str:
    """Checkpoint `step` of `objects` = {name: object with state_dict()}: tensor values become `<name>.<key>`
    in the safetensors file (host copies), other values JSON metadata under `<name>`. Returns the JSON
    path."""
    tensors, meta = {}, {}
    for name, obj in objects.items():
        for key, value in obj.state_dict().items():
            if torch.is_tensor(value):
                tensors[f"{name}.{key}"] = value.detach().cpu()
            else:
                meta.setdefault(name, {})[key] = value
    return save(folder, step, tensors, meta, keep)


def load_objects(folder: str, objects: dict) -> int:
    """Load the newest good checkpoint in `folder` into `objects` (as written by save_objects); returns its
    step, or 0 (nothing loaded) when there is none."""
    found = latest(folder)
    if found is None:
        return 0
    step, tensors, meta = found
    for name, obj in objects.items():
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        obj.load_state_dict({**state, **meta.get(name, {})})
    return step


class OptimizerState:
    """An optimiser as a state object of flat tensors + JSON (no pickle): `state.<param>.<key>` tensors
    (Adam's moments and step), `param_groups` and `state_keys` metadata."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt

    def state_dict(self) -> dict:
        return optimizer_to_flat(self.opt)

    def load_state_dict(self, state: dict) -> None:
        optimizer_from_flat(self.opt, state)


# ---- optimiser state as flat tensors + JSON (no pickle) --------------------------------------------------

def optimizer_to_flat(opt: torch.optim.Optimizer) -> dict:
    """The optimiser's state dict as one flat dict: tensors `state.<idx>.<key>`, plus `param_groups` and
    `state_keys` (JSON)."""
    sd = opt.state_dict()
    flat, state_keys = {}, {}
    for idx, st in sd["state"].items():
        state_keys[str(idx)] = []
        for k, v in st.items():
            flat[f"state.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
            state_keys[str(idx)].append(k)
    return {**flat, "param_groups": sd["param_groups"], "state_keys": state_keys}


def optimizer_from_flat(opt: torch.optim.Optimizer, flat: dict) -> None:
    state = {int(idx): {k: flat[f"state.{idx}.{k}"] for k in keys}
             for idx, keys in flat["state_keys"].items()}
    opt.load_state_dict({"state": state, "param_groups": flat["param_groups"]})
