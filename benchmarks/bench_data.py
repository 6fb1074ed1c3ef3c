"""The data path: decode-once cache vs decoding at every point, streamed vs resident evaluation, uint8 vs float32.

    python benchmarks/bench_data.py [--photos 300] [--images 2048] [--points 4] [--out benchmarks/results/data.json]

Three measurements, in one run (the machine's noise is shared by all of them):

1. A folder of JPEG photos of mixed sizes (written here, 250-500 px): building the decoded cache (resize 256 +
   centre crop 224, worker processes) in images/s; loading it again from the cache; decoding the folder
   serially (what a tool that decodes at every point pays per point).
2. PreResNet-20 on CIFAR-shaped uint8 data: evaluator points/s with the split resident vs streamed through the
   prefetch ring (a memory budget smaller than the split). Goal: streamed >= 0.9 of resident.
3. Resident memory (RSS growth of a child process) holding the same images as uint8 vs float32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from widthkit.engine.config import EvalConfig  # noqa: E402
from widthkit.engine.evaluator import Evaluator  # noqa: E402
from widthkit.inputs import imagefolder  # noqa: E402
from widthkit.inputs.data import Dataset, load_dataset  # noqa: E402
from widthkit.models import create_model  # noqa: E402


def write_photos(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = int(rng.integers(250, 500)), int(rng.integers(250, 500))
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        arr = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]  # blocky, JPEG-like content
        p = root / "train" / f"c{i % 10}" / f"{i:05d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(p, quality=90)


def bench_cache(n: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        write_photos(root, n)
        t = time.perf_counter()
        load_dataset(f"imagefolder:{root}", workers=workers, progress=False)
        build = time.perf_counter() - t
        t = time.perf_counter()
        ds = load_dataset(f"imagefolder:{root}", workers=workers, progress=False)
        ds.images.clone()  # read every image from the cache
        reuse = time.perf_counter() - t
        from PIL import Image

        tf = imagefolder.Transform.for_size(224)
        files = sorted((root / "train").rglob("*.jpg"))
        t = time.perf_counter()
        for f in files:
            with Image.open(f) as img:
                tf.apply(img)
        serial = time.perf_counter() - t
    return {"photos": n, "workers": workers, "build_s": build, "build_images_per_s": n / build,
            "reuse_s": reuse, "reuse_images_per_s": n / reuse, "decode_serial_s": serial, "decode_serial_images_per_s": n / serial,
            "reuse_vs_decoding_per_point": serial / reuse}


def bench_stream(n: int, points: int) -> dict:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    ds = Dataset("random", images, labels, 10, (0.5,) * 3, (0.25,) * 3, "train")
    model = create_model("preresnet20").eval()
    out = {"images": n, "points": points, "model": "preresnet20", "bn_mode": "keep"}
    d = torch.randn(1, sum(p.numel() for p in model.parameters()))
    coords = np.linspace(0, 1, points)[:, None]
    results = {}
    for name, budget in (("resident", None), ("streamed", "1MB"), ("resident_again", None)):
        ev = Evaluator(model, ds, ds, EvalConfig(bn_mode="keep", max_memory=budget), splits=("test",))
        assert ev.test.resident == (budget is None)
        ev.evaluate(ev.theta0, d, coords[:1])  # warm-up
        t = time.perf_counter()
        results[name] = ev.evaluate(ev.theta0, d, coords)
        out[f"{name}_points_per_s"] = points / (time.perf_counter() - t)
    out["identical"] = bool(all(np.array_equal(results["resident"][m], results["streamed"][m])
                                for m in results["resident"]))
    best_resident = max(out["resident_points_per_s"], out["resident_again_points_per_s"])
    out["streamed_vs_resident"] = out["streamed_points_per_s"] / best_resident
    return out


CHILD = """
import os, sys, torch
from widthkit.inputs.data import Dataset
from widthkit.engine.evaluator import EvalSet
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
n = int(sys.argv[1]); kind = sys.argv[2]
base = rss()
images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
ds = Dataset("random", images, torch.zeros(n, dtype=torch.int64), 10, (0.5,) * 3, (0.25,) * 3, "train")
if kind == "float32":
    es = EvalSet(ds.normalized(), ds.labels)
    del images, ds
else:
    es = EvalSet.from_dataset(ds, "cpu")
print(rss() - base)
"""


def bench_memory(n: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = {"images": n, "float32_bytes": n * 3 * 32 * 32 * 4, "uint8_bytes": n * 3 * 32 * 32}
    for kind in ("uint8", "float32"):
        r = subprocess.run([sys.executable, "-c", CHILD, str(n), kind], capture_output=True, text=True, env=env,
                           check=True)
        out[f"{kind}_rss_growth_bytes"] = int(r.stdout.strip())
    out["rss_ratio_float32_vs_uint8"] = out["float32_rss_growth_bytes"] / max(1, out["uint8_rss_growth_bytes"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=300)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--memory-images", type=int, default=50_000)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    res["cache"] = bench_cache(a.photos, a.workers)
    print(json.dumps(res["cache"], indent=1), flush=True)
    res["stream"] = bench_stream(a.images, a.points)
    print(json.dumps(res["stream"], indent=1), flush=True)
    res["memory"] = bench_memory(a.memory_images)
    print(json.dumps(res["memory"], indent=1), flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
