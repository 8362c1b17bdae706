"""capsjax in both precisions and the PyTorch peer in its four variants, back to back on one machine: one JSON line.

Runs ``throughput.py --precision float32`` and ``--precision mixed`` (fresh processes), then the peer of
``../shared/bench`` (``torch_capsnet.py`` through its ``run_repeats.py``: eager, ``--bf16``, ``--compile``,
``--compile --bf16``), each ``--rounds`` times alternating, and reports every figure with the machine it ran on.
Stop long runs first: everything else on the CPU shows in the figures.

    python benchmarks/peer_table.py --torch-python /tmp/venv-torch/bin/python --rounds 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER_VARIANTS = {"eager": [], "bf16": ["--bf16"], "compile": ["--compile"], "compile_bf16": ["--compile", "--bf16"]}


def _last_json(command: list[str], cwd: Path | None = None) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="alternated rounds of every variant")
    parser.add_argument("--torch-python", default=None, help="a Python with torch (the peer's venv); omit to skip")
    parser.add_argument("--bench-dir", default=str(HERE.parents[1] / "shared" / "bench"), help="the peer's folder")
    parser.add_argument("--peer-steps", type=int, default=20)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from _setup import machine

    rows: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for precision in ("float32", "mixed"):
            out = _last_json([sys.executable, str(HERE / "throughput.py"), "--batch-size", str(args.batch_size),
                              "--precision", precision])  # fmt: skip
            rows.setdefault(f"capsjax_{precision}", []).append(
                {k: out[k] for k in ("train_img_per_s", "infer_img_per_s", "compile_s", "peak_rss_mb")}
            )
        if args.torch_python:
            for name, flags in PEER_VARIANTS.items():
                out = _last_json([args.torch_python, "run_repeats.py", "--repeats", "1", "--",
                                  "--batch-size", str(args.batch_size), "--threads", "2",
                                  "--steps", str(args.peer_steps), *flags], cwd=Path(args.bench_dir))  # fmt: skip
                rows.setdefault(f"torch_{name}", []).append(out)
    print(json.dumps({"batch_size": args.batch_size, **machine(), "rounds": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
