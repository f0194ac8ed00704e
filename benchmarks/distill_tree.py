"""Progressive distillation (THEORY T35) on the exact tree, issue 20's tree target: quality against steps for
the teacher with Heun, the teacher with DPM-Solver++(2M) at the same NFE, and the distilled students.

Per training seed: a teacher (`gendiff train --preset toy-reference`, recipe --recipe, seed s), then `gendiff
distill TEACHER --rounds R --steps S` (students at S/2, S/4, … steps, Euler on their grid), then `gendiff
eval` of each (teacher: Heun at the run's 32 steps = 63 NFE, Euler at S steps on EDM's ρ = 7 grid (close to
what the first student learns to reproduce: Euler on the nested distillation grid) and DPM-Solver++(2M) at
every student's NFE; students: Euler on their own grid) with each --eval-seeds sample seed. Everything goes
through the CLI, so this measures what a user gets. Resumable: finished teachers and rounds are kept (gendiff
distill resumes by round), and each evaluation is appended to OUT/results.jsonl as it finishes and skipped on
a rerun (OUT/options.json records recipe, rounds, steps and iterations; a rerun with others is refused). The
summary uses the --seeds and --eval-seeds of the call.
Summary (OUT/summary.md, OUT/summary.json): per configuration the mean over sample seeds per training seed,
then mean ± sd across training seeds, and the pooled sd over sample seeds (the sampling noise).

Usage: python benchmarks/distill_tree.py [--out results/distill-tree] [--seeds 0,1] [--eval-seeds 0,1,2]
       [--rounds 4] [--steps 64] [--recipe confidence] [--iterations N] [--samples 16384] [--threads 1]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

METRICS = ("mmd", "outlier_rate", "median_nll")


def gendiff(*args, threads):
    cmd = [sys.executable, "-m", "gendiff.cli", *args, "--threads", str(threads)]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/distill-tree")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--eval-seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--recipe", default="confidence")
    ap.add_argument("--iterations", type=int, default=None, help="per round (default: the teacher's)")
    ap.add_argument("--samples", type=int, default=16384,
                    help="samples per evaluation (the main job's 16,384; MMD²'s sd shrinks as 1/n)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    eval_seeds = [int(s) for s in args.eval_seeds.split(",")]
    os.makedirs(args.out, exist_ok=True)
    # what the folder's results depend on: a rerun with other options into the same folder is refused
    options = {"recipe": args.recipe, "rounds": args.rounds, "steps": args.steps,
               "iterations": args.iterations}
    opt_path = os.path.join(args.out, "options.json")
    if os.path.exists(opt_path):
        with open(opt_path) as f:
            before = json.load(f)
        if before != options:
            raise SystemExit(f"{args.out} holds results for {before}, not {options}: give another --out")
    else:
        with open(opt_path, "w") as f:
            json.dump(options, f)
    log = os.path.join(args.out, "results.jsonl")
    done = {}
    if os.path.exists(log):
        with open(log) as f:
            for line in f:
                r = json.loads(line)
                r.setdefault("samples", 4096)          # rows written before --samples existed
                done[(r["seed"], r["model"], r["sampler"], r["steps"], r["eval_seed"], r["samples"])] = r
    student_steps = [args.steps >> k for k in range(1, args.rounds + 1)]
    for seed in seeds:
        teacher = os.path.join(args.out, f"seed-{seed}", "teacher")
        if not os.path.exists(os.path.join(teacher, "metrics.json")):
            if os.path.exists(os.path.join(teacher, "config.toml")):
                gendiff("train", "--resume", teacher, "--no-progress", threads=args.threads)
            else:
                gendiff("train", "--preset", "toy-reference", "--set", f"recipe={args.recipe}",
                        "--set", f"seed={seed}", "--out", teacher, "--no-progress", threads=args.threads)
        distilled = os.path.join(args.out, f"seed-{seed}", "distill")
        if not os.path.exists(os.path.join(distilled, f"round-{args.rounds}", "metrics.json")):
            extra = ["--iterations", str(args.iterations)] if args.iterations else []
            gendiff("distill", teacher, "--rounds", str(args.rounds), "--steps", str(args.steps), "--out",
                    distilled, "--no-progress", *extra, threads=args.threads)
        # the first student's target is the teacher's Euler (DDIM) steps at --steps: that sampler is the
        # students' own ceiling, beside Heun-63 (the teacher's best)
        runs = [("teacher", teacher, "heun", 32), ("teacher", teacher, "euler", args.steps)]
        runs += [("teacher", teacher, "dpmpp_2m", n) for n in student_steps]
        runs += [(f"student-{n}", os.path.join(distilled, f"round-{k + 1}"), "euler", n)
                 for k, n in enumerate(student_steps)]
        for model, folder, sampler, steps in runs:
            for es in eval_seeds:
                key = (seed, model, sampler, steps, es, args.samples)
                if key in done:
                    continue
                opts = [] if model != "teacher" else ["--sampler", sampler, "--steps", str(steps)]
                gendiff("eval", folder, "--seed", str(es), "--samples", str(args.samples), *opts,
                        threads=args.threads)
                name = f"eval-{sampler}-{steps}-tweedie.json"
                with open(os.path.join(folder, name)) as f:
                    m = json.load(f)
                if m.get("seed") != es or m.get("steps") != steps:
                    raise RuntimeError(f"{folder}/{name} is not the evaluation just run: {m}")
                r = {"seed": seed, "model": model, "sampler": sampler, "steps": steps, "eval_seed": es,
                     "samples": args.samples, "nfe": m["nfe"], **{k: m[k] for k in METRICS}}
                with open(log, "a") as f:
                    f.write(json.dumps(r) + "\n")
                done[key] = r
    summarize({k: r for k, r in done.items()
               if r["seed"] in seeds and r["eval_seed"] in eval_seeds and r["samples"] == args.samples},
              args.out)


def summarize(done: dict, out: str) -> None:
    """Per configuration: the mean over sample seeds per training seed, then the mean and sd of those
    across training seeds (`sd_train`), and the sampling noise (`sd_samples`: the root mean over training
    seeds of the variance over sample seeds)."""
    configs = sorted({(r["model"], r["sampler"], r["steps"], r["nfe"]) for r in done.values()},
                     key=lambda c: (-c[3], c[0] != "teacher", c[1]))
    rows = []
    table = ["| model | sampler | steps | NFE | MMD² | outlier rate | median NLL | training seeds |",
             "|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for model, sampler, steps, nfe in configs:
        per_seed = {}
        for r in done.values():
            if (r["model"], r["sampler"], r["steps"]) == (model, sampler, steps):
                per_seed.setdefault(r["seed"], []).append(r)
        stats = {}
        for k in METRICS:
            means = [statistics.mean(x[k] for x in rs) for rs in per_seed.values()]
            within = [statistics.variance([x[k] for x in rs]) for rs in per_seed.values() if len(rs) > 1]
            stats[k] = {"mean": statistics.mean(means),
                        "sd_train": statistics.stdev(means) if len(means) > 1 else nan,
                        "sd_samples": statistics.mean(within) ** 0.5 if within else nan}
        rows.append({"model": model, "sampler": sampler, "steps": steps, "nfe": nfe,
                     "training_seeds": sorted(per_seed), **stats})
        cell = lambda k, f: (f"{stats[k]['mean']:{f}} ± {stats[k]['sd_train']:.1e} "   # noqa: E731
                             f"({stats[k]['sd_samples']:.1e})")
        table.append(f"| {model} | {sampler} | {steps} | {nfe} | {cell('mmd', '.2e')} | "
                     f"{cell('outlier_rate', '.4f')} | {cell('median_nll', '.3f')} | {len(per_seed)} |")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(rows, f, indent=1)
    text = ("mean over training seeds ± their sd (in brackets: the sd over sample seeds, pooled)\n\n"
            + "\n".join(table) + "\n")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
