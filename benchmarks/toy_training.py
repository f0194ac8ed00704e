"""Training speed of every run kind of `gendiff ablate` at the reference batch (4096), on this machine.

Prints it/s per trained run kind, the ratio to 30 it/s, and its share of this machine's matmul bound: the
step's matrix products alone (the network's forward, its weight gradients and its input gradients, at the
step's shapes), timed in the same process; their FLOPs over that time is the GFLOP/s the bound assumes.
Baseline in the same process: score matching with the exact score from the one-shot einsum formulation
of the mixture (benchmarks/mixture.py) instead of GaussianMixture.score.
Usage: python benchmarks/toy_training.py [--iterations 200] [--batch 4096] [--threads N]
"""
import argparse
import time
from dataclasses import replace

import torch

from gendiff import losses
from gendiff.data.sources import ToyBatches
from gendiff.experiments.ablate import AblateConfig
from gendiff.experiments.recipes import TOY_RECIPES
from gendiff.data.toy import tree
from gendiff.runtime import configure
from gendiff.experiments.config import ToyTrainConfig
from gendiff.train import train


def matmul_shapes(net, batch: int) -> list:
    """(M, K, N) of every matrix product of one training step of an MLP `net`: per linear layer (in → out) the
    forward x·Wᵀ [batch, in]·[in, out], the weight gradient gᵀ·x [out, batch]·[batch, in] and, except for the
    first layer (its input needs no gradient), the input gradient g·W [batch, out]·[out, in]."""
    layers = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    shapes = []
    for i, lin in enumerate(layers):
        n_in, n_out = lin.in_features, lin.out_features
        shapes += [(batch, n_in, n_out), (n_out, batch, n_in)] + ([(batch, n_out, n_in)] if i else [])
    return shapes


def matmul_bound(shapes, repeats: int = 50) -> tuple:
    """(step's matmul seconds, its GFLOP/s): the products of `shapes` timed on random float32 operands."""
    ops = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    for a, b in ops:
        a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        for a, b in ops:
            a @ b
    secs = (time.perf_counter() - t) / repeats
    return secs, 2 * sum(m * k * n for m, k, n in shapes) / secs / 1e9


CATEGORIES = (   # op name prefixes → what bounds the step
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm")),
    ("SiLU fwd+bwd", ("aten::silu",)),
    ("copies", ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::clone", "aten::empty")),
    ("Adam+EMA (foreach)", ("aten::_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt")),
)


def breakdown(model, loss, src, batch: int, mixture: bool, steps: int = 30) -> str:
    """Self CPU time per step by category (CATEGORIES; the rest is 'other small ops': sums, the loss, the σ
    density, finiteness checks, autograd bookkeeping), from the torch profiler over `steps` steps; for
    score matching also the exact mixture score of one batch timed alone (it is inside 'other')."""
    from torch.profiler import profile
    with profile() as prof:
        train(model, loss, src, ToyTrainConfig(iterations=steps, batch=batch), progress=False)
    spent = {c: 0.0 for c, _ in CATEGORIES}
    other = 0.0
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        cat = next((c for c, prefixes in CATEGORIES if e.key.startswith(prefixes)), None)
        if cat is None:
            other += e.self_cpu_time_total
        else:
            spent[cat] += e.self_cpu_time_total
    total = sum(spent.values()) + other
    parts = [f"{c} {v / steps / 1e3:.2f} ms ({v / total:.0%})" for c, v in spent.items()]
    parts.append(f"other small ops {other / steps / 1e3:.2f} ms ({other / total:.0%})")
    line = f"    per step (aten self time {total / steps / 1e3:.2f} ms): " + ", ".join(parts)
    if mixture:
        batch_draw = src.draw(batch, torch.exp(torch.randn(batch) * 1.2 - 1.2))
        g, x, s = src.mixture, batch_draw.x_noisy, batch_draw.sigma.reshape(-1)
        g.score(x, s)
        t = time.perf_counter()
        for _ in range(10):
            g.score(x, s)
        line += f"\n    of which the exact mixture score alone: {(time.perf_counter() - t) / 10 * 1e3:.2f} ms"
    return line


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true",
                    help="per run kind, where a step's time goes (torch profiler, 30 steps; see `breakdown`)")
    args = ap.parse_args()
    configure(args.threads)
    cfg = AblateConfig()
    tcfg = ToyTrainConfig(iterations=args.iterations, batch=args.batch)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.iterations} iterations per kind")
    probe = TOY_RECIPES["edm"].build_model(cfg.train).net
    secs, gflops = matmul_bound(matmul_shapes(probe, args.batch))
    flop = 2 * sum(m * k * n for m, k, n in matmul_shapes(probe, args.batch))
    print(f"matmul bound (edm's network; others differ only in the output layer): {flop / 1e6:.0f} MFLOP "
          f"per step at {gflops:.0f} GFLOP/s = {secs * 1e3:.2f} ms, {1 / secs:.0f} it/s")
    print(f"{'run kind':<18} {'it/s':>8} {'vs 30 it/s':>11} {'of bound':>9}")
    for name in ("edm", "confidence-frozen", "confidence", "confidence-full", "seed-method",
                 "score-matching"):
        spec = TOY_RECIPES[name]
        torch.manual_seed(0)
        model = spec.build_model(cfg.train)
        src = ToyBatches(tree("A"), spec.mode, need_score=spec.loss == "score-matching")
        loss = losses.make_loss(spec.loss)
        train(model, loss, src, ToyTrainConfig(iterations=5, batch=args.batch), progress=False)  # warm-up
        res = train(model, loss, src, tcfg, progress=False)
        bound = 1 / matmul_bound(matmul_shapes(model.net, args.batch), repeats=20)[0]
        print(f"{name:<18} {res.it_per_s:8.1f} {res.it_per_s / 30:10.2f}x {res.it_per_s / bound:8.0%}")
        if name == "score-matching":
            from mixture import EinsumBaseline  # benchmarks/mixture.py

            class EinsumSource(ToyBatches):
                def draw(self, n, sigma, generator=None):
                    batch = super().draw(n, sigma, generator)
                    batch.score = base.logp_and_score(batch.x_noisy, sigma)[1]
                    return batch
            base = EinsumBaseline(src.mixture, torch.float32)
            esrc = EinsumSource(src.mixture, "point")
            slow = train(model, loss, esrc, ToyTrainConfig(iterations=max(args.iterations // 5, 10),
                                                           batch=args.batch), progress=False)
            print(f"{'  einsum baseline':<18} {slow.it_per_s:8.1f}   ours/baseline "
                  f"{res.it_per_s / slow.it_per_s:.2f}x")
        if name == "edm":  # the network's cost: the seed's 5 linear layers against the 4 gendiff had before
            torch.manual_seed(0)
            small = spec.build_model(replace(cfg.train, hidden_layers=3))
            train(small, loss, src, ToyTrainConfig(iterations=5, batch=args.batch), progress=False)
            r4 = train(small, loss, src, tcfg, progress=False)
            print(f"{'  edm, 4 linear':<18} {r4.it_per_s:8.1f}   seed network (5 linear) / 4 linear: "
                  f"{res.it_per_s / r4.it_per_s:.2f}x")
        if args.profile:
            print(breakdown(model, loss, src, args.batch, name == "score-matching"))

if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t:.1f} s")
