"""When does GaussianMixture take the one-matmul expansion for a scalar σ? It does while the cancellation
bound eps·max‖x‖²·λ_max(P), P = (Σ_k + σ²I)⁻¹, stays below 1e-4 nats (data/toy.py `_logits`).
Prints that bound for the tree in float32 and float64 at several σ, for ‖x‖² = 4 (the tree lies in |x| < 2).
Usage: python benchmarks/expansion_bound.py
"""
import torch

from gendiff.data.toy import tree

gt = tree("A")
lam_min = float(gt.L64.min())
print(f"tree A: smallest component eigenvalue {lam_min:.3g}, so λ_max(P) = 1/({lam_min:.3g} + σ²)")
for dtype in (torch.float32, torch.float64):
    eps = torch.finfo(dtype).eps
    for s in (0.0, 0.002, 0.01, 0.03, 0.1, 1.0):
        bound = eps * 4 / (lam_min + s * s)
        print(f"{str(dtype):>14} σ={s:<6g} bound {bound:9.2e} nats -> "
              f"{'expansion' if bound < 1e-4 else 'exact rotated form'}")
