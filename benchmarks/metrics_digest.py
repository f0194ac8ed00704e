"""sha256 (first 16 hex) of a `gendiff ablate` results folder's metrics, without what may differ between
two runs of the same code on one machine (timings, seconds, it/s) or between two versions of the code (its
own digest, `config.code`, and the recipes' serialised form `config.run_specs`): two folders with the same
digest hold bit-identical metrics. Usage: python benchmarks/metrics_digest.py RESULTS_FOLDER
`--compare A B`: the largest difference between the two folders' metrics, relative to max(|a|, |b|), and
where."""
import hashlib
import json
import sys


def strip(o):
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items()
                if not k.endswith("_s") and k not in ("seconds", "it_per_s")}
    if isinstance(o, list):
        return [strip(v) for v in o]
    return o


def digest(folder: str) -> str:
    with open(folder + "/metrics.json") as f:
        r = json.load(f)
    r.pop("timings", None)
    r.get("config", {}).pop("code", None)
    r.get("config", {}).pop("run_specs", None)
    return hashlib.sha256(json.dumps(strip(r), sort_keys=True).encode()).hexdigest()[:16]


def _leaves(o, path=""):
    if isinstance(o, dict):
        for k, v in o.items():
            yield from _leaves(v, f"{path}.{k}")
    elif isinstance(o, list):
        for i, v in enumerate(o):
            yield from _leaves(v, f"{path}[{i}]")
    elif isinstance(o, (int, float)) and not isinstance(o, bool):
        yield path, float(o)


def compare(a: str, b: str) -> tuple:
    """(largest relative difference, its path, number of compared values) over the numeric metrics."""
    la, lb = ({p: v for p, v in _leaves(strip(json.load(open(f + "/metrics.json"))))
               if not p.startswith((".timings", ".config"))} for f in (a, b))
    if la.keys() != lb.keys():
        raise SystemExit(f"the folders hold different metrics: {sorted(la.keys() ^ lb.keys())[:5]}")
    worst = max(((abs(la[p] - lb[p]) / max(abs(la[p]), abs(lb[p]), 1e-300), p) for p in la),
                default=(0.0, ""))
    return worst[0], worst[1], len(la)


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        rel, where, n = compare(sys.argv[2], sys.argv[3])
        print(f"{n} values; largest relative difference {rel:.2e} at {where}")
    else:
        print(digest(sys.argv[1]))
