#!/usr/bin/env bash
# Back-to-back speed and memory of two checkouts of capsjax on this machine, alternated:
#   git worktree add /tmp/before <commit> && bash benchmarks/compare_trees.sh /tmp/before .
# Prints the CPU, then throughput.py's JSON line twice per tree and memory.py's once per tree.
set -uo pipefail
OLD=$(cd "$1" && pwd); NEW=$(cd "$2" && pwd); PY=${PYTHON:-python}
lscpu | grep "Model name"
for round in 1 2; do
  for tree in "$OLD" "$NEW"; do
    echo "== $tree throughput, round $round"
    (cd "$tree" && PYTHONPATH="$tree" "$PY" benchmarks/throughput.py --batch-size 100 2>/dev/null | tail -1)
  done
done
for tree in "$OLD" "$NEW"; do
  echo "== $tree memory"
  (cd "$tree" && PYTHONPATH="$tree" "$PY" benchmarks/memory.py --batch-sizes 32,128 2>/dev/null | tail -1)
done
