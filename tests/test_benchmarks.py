"""The benchmark scripts run and print their JSON line (tiny settings; the figures themselves live in the README)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # the benchmark scripts compile and run the full model


def run_script(name: str, *args: str) -> dict:
    # One CPU device, as a user's machine has: without the simulated devices of conftest.py. XLA_FLAGS as conftest.py
    # set it (unoptimised code: these runs check the scripts' output, not their speed; compiling is most of their time).
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # this checkout's capsjax
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_throughput_prints_the_fields_the_readme_reports():
    out = run_script("throughput.py", "--batch-size", "4", "--steps", "1", "--repeats", "2", "--warmup", "0")
    for key in ("train_img_per_s", "infer_img_per_s", "compile_s", "peak_rss_mb"):
        assert out[key] > 0, (key, out)
    assert out["batch_size"] == 4 and out["backend"] == "cpu" and out["devices"] == 1 and out["heap_trim"] is True
    assert len(out["train_img_per_s_windows"]) == 2


def test_memory_reports_scratch_growing_with_the_batch():
    out = run_script("memory.py", "--batch-sizes", "2,4,8")
    assert out["batch_sizes"] == [2, 4, 8]
    scratch = out["scratch_mib"]
    assert scratch[0] < scratch[1] < scratch[2]
    # Per image at least the routing predictions (1152 x 10 x 16 floats, 0.70 MiB), and less than those plus one
    # copy of W (which a tiled W would add on top of everything else).
    assert 0.7 < out["scratch_mib_per_image"] < 0.7 + out["tiled_W_would_add_mib_per_image"], out


def test_routing_compare_reports_each_algorithm():
    out = run_script("routing_compare.py", "--preset", "smoke", "--set", "model.class_dim=4", "--routings",
                     "dynamic,em", "--batch-size", "2", "--steps", "1", "--repeats", "1", "--warmup", "0")  # fmt: skip
    assert [r["routing"] for r in out["routings"]] == ["dynamic", "em"]
    assert out["machine"] and out["cpu_count"] >= 1  # the machine of the figures
    for record in out["routings"]:
        for key in ("params", "train_step_s", "scratch_mib", "peak_rss_mib"):
            assert record[key] > 0, (key, record)
    assert out["routings"][0]["params"] != out["routings"][1]["params"]  # EM's primary capsules and 2x2 W differ


def test_canvas_margins_counts_digits_near_the_border(mnist_dir):
    out = run_script("canvas_margins.py", "--data-dir", str(mnist_dir))
    assert out["count"] == 10000
    for name in ("expanded_mnist", "affine_mnist"):
        fractions = [out[name][f"within_{p}px"] for p in range(1, 7)]
        assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1, (name, fractions)
    # expanded MNIST keeps MNIST's ~4 px margins (offsets only where the 28x28 digit fits whole); affine_mnist may not
    assert out["expanded_mnist"]["within_1px"] < 0.01 < out["affine_mnist"]["within_1px"]


def test_matmul_reports_each_precision_per_shape():
    out = run_script("matmul.py", "--shapes", "8x16x4,3x5x7", "--repeats", "1")
    assert [p["shape"] for p in out["products"]] == [[8, 16, 4], [3, 5, 7]]
    assert out["products"][0]["gflop"] == round(2 * 8 * 16 * 4 / 1e9, 2)
    for record in out["products"]:
        for key in ("float32", "bfloat16_operands_float32_accumulation", "bfloat16"):
            assert record[f"{key}_gflop_per_s"] >= 0, (key, record)
    assert out["machine"]["cpu_model"]


def test_matmul_refuses_a_shape_that_is_not_m_by_k_by_n():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "matmul.py"), "--shapes", "8x16"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert result.returncode == 2 and "is not MxKxN" in result.stderr


def test_matmul_gradients_reports_both_forms_of_both_products():
    out = run_script("matmul.py", "--gradients", "--shapes", "8x16x4", "--repeats", "1")
    (record,) = out["gradient_products"]
    assert record["shape"] == [8, 16, 4]
    for dtype in ("float32", "bfloat16_operands"):
        for product in ("input_grad", "weight_grad"):
            for form in ("folded", "row_major"):
                assert record[f"{dtype}_{product}_{form}_gflop_per_s"] >= 0, record
    assert out["machine"]["cpu_model"]
