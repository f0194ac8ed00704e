"""Typed run configuration: dataclasses, named presets, TOML files and `--set key=value` overrides (issue 9).

A `TrainRunConfig` is the whole recipe of one `gendiff train` run; `resolve(preset, toml_path, sets)` builds it
in that order (preset, then the file, then each override) and validates it before anything touches the disk.
Every error names the key, the value given and what is allowed. `to_toml` writes the fully resolved config,
which `resolve(toml_path=...)` reads back to the same object (tested), so a run folder's `config.toml` is
enough to re-run it.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass

from .checks import check_choice, check_positive
from .evaluate import SamplerConfig
from .train import ToyTrainConfig


@dataclass
class CheckpointConfig:
    every: int = 256          # steps between checkpoints (0: only at the end and on Ctrl-C)
    keep: int = 3             # newest checkpoints kept

    def validate(self):
        check_positive("checkpoint.every", self.every, integer=True, allow_zero=True)
        check_positive("checkpoint.keep", self.keep, integer=True)


@dataclass
class EvalConfig:
    samples: int = 4096       # samples drawn and measured at the end of training
    eval_points: int = 4096   # held-out noisy points (score error, calibration)

    def validate(self):
        check_positive("eval.samples", self.samples, integer=True)
        check_positive("eval.eval_points", self.eval_points, integer=True)


@dataclass
class TrainRunConfig:
    run: str = "confidence"   # a recipe of `gendiff ablate --help` (head, batch mode, loss, precond, density)
    classes: str = "A"        # tree classes of the data
    seed: int = 0
    train: ToyTrainConfig = field(default_factory=ToyTrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self):
        from .ablate import RUNS
        from .data.toy import TREE_CLASSES
        check_choice("run", self.run, RUNS)
        if RUNS[self.run].model is not None:
            raise ValueError(f"run={self.run!r} reuses another run's model ({RUNS[self.run].model!r}); "
                             f"train that run instead")
        check_choice("classes", self.classes, TREE_CLASSES)
        check_positive("seed", self.seed, integer=True, allow_zero=True)
        for part in (self.train, self.sampler, self.checkpoint, self.eval):
            part.validate()
        return self


PRESETS = {
    "toy-reference": lambda: TrainRunConfig(),
    "toy-quick": lambda: TrainRunConfig(train=ToyTrainConfig(iterations=256, batch=512, lr_ref_iter=64,
                                                             snapshot_every=128),
                                        checkpoint=CheckpointConfig(every=64), eval=EvalConfig(1024, 1024)),
}


def _type_name(v) -> str:
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
            tuple: "a list", list: "a list"}.get(type(v), type(v).__name__)


def _coerce(key: str, old, value):
    """`value` (from TOML or text) as the type of the field's current value `old`, or a ValueError."""
    if isinstance(value, str) and not isinstance(old, str):
        text = value.strip()
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            raise ValueError(f"{key}={text!r} is not {_type_name(old)}") from None
    if isinstance(old, bool):
        ok = isinstance(value, bool)
    elif isinstance(old, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(old, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        ok = ok and math.isfinite(value)
    elif isinstance(old, (tuple, list)):
        ok = isinstance(value, (list, tuple)) and len(value) == len(old)
        value = tuple(_coerce(f"{key}[{i}]", o, v) for i, (o, v) in enumerate(zip(old, value))) if ok else value
    else:
        ok = isinstance(value, type(old))
    if not ok:
        raise ValueError(f"{key}={value!r} is not {_type_name(old)}"
                         + (f" of length {len(old)}" if isinstance(old, (tuple, list)) else ""))
    return value


def _set(obj, dotted: str, value, prefix: str = ""):
    head, _, rest = dotted.partition(".")
    names = [f.name for f in fields(obj)]
    key = prefix + head
    if head not in names:
        raise ValueError(f"unknown key {key!r}; allowed: " + ", ".join(prefix + n for n in names))
    old = getattr(obj, head)
    if is_dataclass(old):
        if not rest:
            raise ValueError(f"{key} is a table; set one of its keys: "
                             + ", ".join(f"{key}.{f.name}" for f in fields(old)))
        _set(old, rest, value, key + ".")
    else:
        if rest:
            raise ValueError(f"{key} is not a table; {dotted!r} does not exist")
        # object.__setattr__: some parts (SamplerConfig) are frozen; the tree being built is resolve()'s own
        object.__setattr__(obj, head, _coerce(key, old, value))


def _flatten(table: dict, prefix: str = ""):
    for k, v in table.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def resolve(preset: str = "toy-reference", toml_path: str | None = None, sets=()) -> TrainRunConfig:
    """Preset, then the TOML file, then each `key=value` of `sets`; validated. Pure: touches no disk but the
    file it reads."""
    check_choice("preset", preset, PRESETS)
    cfg = PRESETS[preset]()
    if toml_path is not None:
        try:
            with open(toml_path, "rb") as f:
                table = tomllib.load(f)
        except OSError as e:
            raise ValueError(f"--config={toml_path!r} cannot be read ({e.strerror or e})") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config={toml_path!r} is not valid TOML ({e})") from None
        for key, value in _flatten(table):
            _set(cfg, key, value)
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set {item!r} must look like key=value, e.g. train.batch=512")
        _set(cfg, key.strip(), value)
    return cfg.validate()


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def to_toml(cfg) -> str:
    """The dataclass tree as TOML: scalars first, then one [table] per nested dataclass."""
    lines, tables = [], []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        (tables if is_dataclass(v) else lines).append((f.name, v))
    out = [f"{k} = {_toml_value(v)}" for k, v in lines]
    for name, sub in tables:
        out += ["", f"[{name}]"] + [f"{f.name} = {_toml_value(getattr(sub, f.name))}" for f in fields(sub)]
    return "\n".join(out) + "\n"


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
