"""The latent table's rows over sample seeds (issue 19): FID of each row of a `gendiff ablate --suite latent`
folder, read from the `gendiff eval` files of several sample seeds, with the paired differences between rows
(the same seed draws the same starting noise for every row, so row differences are paired).

Make the files first, per seed S and table T (n = 2000 here):
  gendiff eval T/a --samples 2000 --seed S;  gendiff eval T/b --samples 2000 --seed S
  gendiff eval T/c --samples 2000 --seed S --sampling-sigma diffusion   (and --sampling-sigma total)
Usage: python benchmarks/latent_seeds.py TABLE [TABLE ...] [--samples 2000] [--seeds 0,1,2]
"""
import argparse
import json
import os
import statistics

ROWS = {"a": ("a", ""), "b": ("b", ""), "c-diffusion": ("c", ""), "c-total": ("c", "-total")}
PAIRS = (("c-diffusion", "a"), ("c-diffusion", "b"), ("c-diffusion", "c-total"), ("a", "b"))


def sd(v):
    return statistics.stdev(v) if len(v) > 1 else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tables", nargs="+", help="folders written by gendiff ablate --suite latent")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    for table in args.tables:
        fid = {}
        for row, (folder, suffix) in ROWS.items():
            cells = []
            for s in seeds:
                path = os.path.join(table, folder, f"eval-default-{args.samples}-seed{s}{suffix}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        cells.append(json.load(f))
            fid[row] = [c["fid"] for c in cells]
            if cells:
                print(f"{table} {row}: {len(cells)} seeds, FID {statistics.mean(fid[row]):.2f} ± "
                      f"{sd(fid[row]):.2f} (sd over seeds; per seed {[round(v, 2) for v in fid[row]]}, "
                      f"bootstrap sds {[round(c['fid_sd'], 2) for c in cells]}), precision "
                      f"{statistics.mean(c['precision'] for c in cells):.3f}, recall "
                      f"{statistics.mean(c['recall'] for c in cells):.3f}")
        for a, b in PAIRS:
            k = min(len(fid[a]), len(fid[b]))
            if k:
                d = [x - y for x, y in zip(fid[a][:k], fid[b][:k])]
                print(f"  {a} − {b}: {statistics.mean(d):+.2f} ± {sd(d):.2f} (paired, sd over {k} seeds; per "
                      f"seed {[round(v, 2) for v in d]})")


if __name__ == "__main__":
    main()
