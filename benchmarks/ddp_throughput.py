"""Data-parallel throughput on this machine: `torchrun --nproc_per_node 2` (gloo, 1 thread per process)
against one process with 1 and with 2 threads, the same toy run, global batch and steps
(`gendiff train`, toy-quick recipe). Prints training it/s of each (from the run's metrics.jsonl:
steps / seconds of the loop, evaluation excluded) and the ratios against one process. Usage: python
benchmarks/ddp_throughput.py [--iterations 512] [--batch 4096]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile


def run(cmd, out, env):
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    first, last = lines[0], lines[-1]  # from the first logged step: excludes start-up and process-group setup
    return (last["step"] - first["step"]) / (last["seconds"] - first["seconds"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--run", default="confidence")
    args = ap.parse_args()
    sets = ["--preset", "toy-quick", "--set", f"run={args.run}", "--set",
            f"train.iterations={args.iterations}",
            "--set", f"train.batch={args.batch}", "--set", "checkpoint.every=0", "--set", "eval.samples=256",
            "--set", "eval.eval_points=256", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    gendiff = [sys.executable, "-m", "gendiff.cli", "train"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                "gendiff.cli", "train"]
    print(f"toy run {args.run!r}, global batch {args.batch}, {args.iterations} steps")
    with tempfile.TemporaryDirectory() as tmp:
        res = {}
        for name, cmd, threads in (("1 process, 1 thread", gendiff, 1), ("1 process, 2 threads", gendiff, 2),
                                   ("2 processes (gloo), 1 thread each", torchrun, 1)):
            out = os.path.join(tmp, name.split(",")[0].replace(" ", "-") + str(threads))
            res[name] = run([*cmd, *sets, "--threads", str(threads), "--out", out], out, env)
            print(f"{name:<36} {res[name]:8.1f} it/s", flush=True)
        base1, base2 = res["1 process, 1 thread"], res["1 process, 2 threads"]
        ddp = res["2 processes (gloo), 1 thread each"]
        print(f"2 processes / 1 process 1 thread: {ddp / base1:.2f}x; / 1 process 2 threads: "
              f"{ddp / base2:.2f}x")


if __name__ == "__main__":
    main()
