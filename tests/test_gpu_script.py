"""benchmarks/gpu.sh --dry-run: the prepared GPU benchmark runs its whole code on CPU with tiny sizes (but the
compiles, which take minutes on a CPU) and writes a results file that holds every section the GPU run must fill."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~35 s on 2 busy cores: ResNet-20 and ResNet-56 through every section, `pytest -m gpu` collected
@pytest.mark.subprocess
@pytest.mark.timeout(180)
def test_gpu_script_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "results" / "gpu.md"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md, res = out.read_text(), json.loads(out.with_suffix(".json").read_text())

    env_ = res["environment"]
    assert env_["device"] == "cpu" and env_["torch"] and env_["date"] and env_["commit"]
    assert "DRY RUN" in md and f"torch {env_['torch']}" in md and env_["commit"] in md
    assert res["plan"]["dry_run"] and res["elapsed_s"] < 120

    r20 = res["models"]["preresnet20"]
    # ceilings at every precision, full points against the loop, the lever matrix, the deviations
    assert set(r20["ceilings"]) >= {"fp32", "tf32", "bf16-cl", "wall_s"}
    for kind in ("fp32", "tf32", "bf16-cl"):
        assert r20["ceilings"][kind]["best"] > 0
    for key in ("evaluator bf16 keep", "evaluator bf16 recompute", "evaluator fp32 keep", "evaluator fp32 recompute",
                "loop fp32 keep", "loop fp32 recompute"):
        assert r20["full"][key]["s_per_point"] > 0, key
    for key in ("fp32 K1 / keep", "tf32 K1 / keep", "bf16 K1 / keep", "bf16 K1, no graphs / keep",
                "bf16 K2 / keep", "fp32 K1 / recompute", "bf16 K1 / recompute", "bf16 K2 / recompute"):
        lv = r20["levers"][key]
        assert lv["s_per_point"] > 0 and lv["points"] >= 1, key
        assert "CUDA graphs need a CUDA device" in lv["levers"]["cuda_graphs_reason"] or "asked" in \
            lv["levers"]["cuda_graphs_reason"]
    assert r20["levers"]["bf16 K2 / keep"]["k"] == 2
    assert r20["full"]["evaluator bf16 keep"]["levers"]["points_in_flight"] == 1  # auto on CPU
    dev = r20["deviation"]
    assert dev["tf32 K1 / keep"]["test_loss"]["rel"] == 0.0  # tf32 has no effect on CPU
    assert 0 < dev["bf16 K1 / keep"]["test_loss"]["rel"] < 2e-2
    assert dev["bf16 K2 / keep"]["test_loss"]["rel"] < 2e-2
    for mode in ("keep", "recompute"):  # the fp32 evaluator agrees with the loop in the same run
        check = dev[f"loop vs fp32 K1 / {mode}"]
        assert check["ok"] and check["loss_rel"] < 1e-5 and check["err_images"] == 0, check

    lv = r20["full"]["evaluator bf16 keep"]["levers"]  # every lever's choice with its reason, for 2,601 points
    assert lv["eval_batch_size"] == 16 and lv["eval_batch_size_chosen_by"] == "asked"
    assert lv["compile"] is False and "measured and chosen on CUDA only" in lv["compile_reason"]

    plane = res["plane"]
    assert plane["points_total"] == 51 * 51 and plane["model"] == "preresnet56"
    for label, v in plane["variants"].items():  # the start (measurements, compiles, capture) counted once
        assert v["extrapolated_s"] == pytest.approx(v["setup_s"] + v["first_call_s"] + v["s_per_point"] * 2600), label
        assert "grid points 0..0 of 2601" in v["slice"]
    assert len(plane["variants"]) == 3

    pt = res["pytest"]  # `pytest -m gpu` ran: on a CPU every GPU test is collected and skipped
    assert pt["command"] == "python -m pytest -m gpu" and pt["counts"].get("skipped", 0) >= 20, pt
    assert pt["passed"] is False  # nothing ran here
    tr = res["trainer"]
    assert tr["recipe"] == "preresnet110-cifar10" and tr["protocol"] == {"epochs": 250, "prefix": 125,
                                                                         "sgd_branch": 25, "swa_branch": 100}
    for precision in ("fp32", "bf16"):
        r = tr["by_precision"][precision]
        assert r["images_per_s"] > 0 and r["protocol_hours"] == pytest.approx(
            250 * (50_000 / r["images_per_s"] + 10_000 / r["eval_images_per_s"]) / 3600)
    hv = res["hvp"]["contestants"]
    assert set(hv) >= {"widthkit", "double-backward loop"}
    assert hv["double-backward loop"]["rel_diff_to_widthkit"] < 1e-6  # the same products, fp32 on one CPU
    assert hv["double-backward loop"]["widthkit_speedup"] == pytest.approx(
        hv["double-backward loop"]["s_per_hvp"] / hv["widthkit"]["s_per_hvp"])

    names = [t["target"] for t in res["targets"]]
    assert len(names) == 6 and all(isinstance(t["met"], bool) for t in res["targets"]), names
    assert any("HVP on ResNet-20" in n for n in names) and any("pytest -m gpu" in n for n in names)
    assert any("widthkit's default" in n for n in names) and any("best forward ceiling" in n for n in names)
    for t in res["targets"]:  # the Markdown and the JSON tell the same run
        assert t["target"] in md
    for heading in ("## Targets", "## preresnet20", "Forward ceilings", "Full points", "What the evaluator decided",
                    "Levers on the slice", "Deviation from the fp32 evaluator", "51x51 plane",
                    "60 minutes on four GTX 1080 Ti", "## python -m pytest -m gpu", "## Trainer: preresnet20",
                    "## Hessian-vector products: preresnet20"):
        assert heading in md, heading
    assert f"{plane['variants'][next(iter(plane['variants']))]['extrapolated_s']:,.0f} s" in md


@pytest.mark.subprocess
def test_gpu_script_refuses_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--out", str(tmp_path / "x.md")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert proc.returncode == 2 and "no CUDA device here; use --dry-run" in proc.stderr
    assert not (tmp_path / "x.md").exists()
