#!/usr/bin/env bash
# Toy training it/s of this checkout against another commit, side by side on one machine: the two checkouts'
# own benchmarks/toy_training.py, alternated ROUNDS times (A B A B …) so slow drifts of the machine hit both.
# Usage: benchmarks/side_by_side.sh COMMIT [ROUNDS] [ITERATIONS]
#   e.g. benchmarks/side_by_side.sh 50fc715 3 300      (run it on an idle machine)
set -euo pipefail
commit=${1:?a commit to compare with}; rounds=${2:-3}; iters=${3:-300}
here=$(cd "$(dirname "$0")/.." && pwd)
base=$(mktemp -d)
trap 'git -C "$here" worktree remove --force "$base" >/dev/null 2>&1 || true' EXIT
git -C "$here" worktree add --detach -f "$base" "$commit" >/dev/null
for r in $(seq "$rounds"); do
    for side in "$base" "$here"; do
        name=$([ "$side" = "$here" ] && echo "this checkout" || echo "$commit")
        echo "== round $r: $name"
        (cd "$side" && PYTHONPATH="$side" python benchmarks/toy_training.py --iterations "$iters")
    done
done
