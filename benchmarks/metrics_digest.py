"""sha256 (first 16 hex) of a `gendiff ablate` results folder's metrics, without what may differ between
two runs of the same code on one machine (timings, seconds, it/s) or between two versions of the code (its
own digest, `config.code`, and the recipes' serialised form `config.run_specs`): two folders with the same
digest hold bit-identical metrics. Usage: python benchmarks/metrics_digest.py RESULTS_FOLDER"""
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


if __name__ == "__main__":
    print(digest(sys.argv[1]))
