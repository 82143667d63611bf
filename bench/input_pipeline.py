"""Host input pipeline throughput: decode + RandomResizedCrop(224) + flip + batch, kdjax's streamed source against
torchvision's ImageFolder + DataLoader (PIL, the original's loader) on the same generated JPEGs, in the same run.

    python bench/input_pipeline.py --quick          # 128 images, one core each side
    python bench/input_pipeline.py                  # 1000 images, one core and all cores
    python bench/input_pipeline.py --torch-python /path/to/venv/bin/python   # default: $KDJAX_TORCH_PYTHON

The JPEGs imitate ImageNet's: 400-600 x 300-450 pixels (500x375 on average), quality 90, about 110 KB each
(smooth colour fields plus noise at two scales). They are written as an ImageFolder tree, prepared into record
shards (``kdjax.data.streamed``) and read back through the streamed source (grain), batch 64.

Per-core figures are images per CPU-second of the process (``time.process_time``: every thread of the process,
workers excluded - both sides run in-process for them), so that they hold on a machine shared with other work;
wall-clock images/s are reported beside them. The sides alternate ``--repeats`` times (default 3) and each row is the
median run, with all runs' figures in the JSON. torchvision runs in its own venv (the library never imports torch)
with ``torch.set_num_threads(1)``, ``num_workers=0`` for the per-core figure, and its full transform
(``ToTensor`` + ``Normalize`` included: the original's loader does that work on the host, kdjax on the device).
"""
import argparse
import datetime
import io
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from results_io import cpu_model, default_torch_python, output_path, write_json  # noqa: E402

BATCH = 64
NUM_CLASSES = 8

TORCH_SIDE = r"""
import json, sys, time, torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms as T
root, workers, passes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
torch.manual_seed(0)
tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
loader = DataLoader(datasets.ImageFolder(root, transform=tf), batch_size=%d, shuffle=True, num_workers=workers,
                    persistent_workers=workers > 0)
for images, labels in loader:  # warm-up pass (file cache, worker start)
    pass
n, wall, cpu = 0, time.perf_counter(), time.process_time()
for _ in range(passes):
    for images, labels in loader:
        n += images.shape[0]
print(json.dumps({"images": n, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                  "torch": torch.__version__}))
""" % BATCH


def make_jpeg(rng: np.random.Generator) -> bytes:
    from PIL import Image

    width, height = int(rng.integers(400, 601)), int(rng.integers(300, 451))
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 100 * np.sin(x / rng.uniform(17, 47) + rng.uniform(0, 6)),
                     128 + 100 * np.cos(y / rng.uniform(11, 41)),
                     128 + 90 * np.sin((x + y) / rng.uniform(23, 43))], -1)
    coarse = np.kron(rng.normal(0, 30, (height // 4 + 1, width // 4 + 1, 3)), np.ones((4, 4, 1)))[:height, :width]
    pixels = np.clip(base + coarse + rng.normal(0, 15, (height, width, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_tree(root: pathlib.Path, num_images: int) -> dict:
    rng = np.random.default_rng(0)
    sizes = []
    for split, count in (("train", num_images), ("val", NUM_CLASSES)):
        for i in range(count):
            folder = root / split / f"n{i % NUM_CLASSES:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            data = make_jpeg(rng)
            (folder / f"img_{i:06d}.JPEG").write_bytes(data)
            sizes.append(len(data))
    return {"images": num_images, "mean_kb": float(np.mean(sizes) / 1e3)}


def timed_ours(dataset, threads: int, passes: int) -> dict:
    from kdjax.data import epochs
    from kdjax.data.streamed import ProcessShare, host_iterator

    plan = epochs.make_plan(dataset.num_train, BATCH, 1, last_batch="keep")
    steps = dataset.train_steps(plan, passes + 1, seed=0, share=ProcessShare())
    it = host_iterator(steps, threads=threads, buffer=2 * threads)
    for _ in range(plan.steps_per_epoch):  # warm-up epoch
        next(it)
    n, wall, cpu = 0, time.perf_counter(), time.process_time()
    for _ in range(passes * plan.steps_per_epoch):
        n += next(it)["images"].shape[0]
    return {"images": n, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def timed_torchvision(torch_python: str, root: pathlib.Path, workers: int, passes: int) -> dict:
    result = subprocess.run([torch_python, "-c", TORCH_SIDE, str(root / "train"), str(workers), str(passes)],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        raise RuntimeError(f"the torchvision side failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def rates(row: dict, own_process: bool = True) -> dict:
    """Images per wall second and per CPU-second; the latter only when all the work ran in this process (the CPU
    time of DataLoader worker processes is not the parent's)."""
    per_cpu = row["images"] / row["cpu_s"] if own_process else None
    return {**row, "images_per_s": row["images"] / row["wall_s"], "images_per_cpu_s": per_cpu}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--passes", type=int, default=None)
    parser.add_argument("--torch-python", default=default_torch_python())
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each side; medians reported")
    args = parser.parse_args()
    num_images = args.images or (128 if args.quick else 1000)
    passes = args.passes or (2 if args.quick else 3)
    cores = os.cpu_count() or 1

    from kdjax.data.streamed import StreamedDataset, prepare_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        files = write_tree(tmp / "manual", num_images)
        t0 = time.perf_counter()
        manifest = prepare_dataset("imagenet", tmp / "manual", tmp / "data",
                                   classes=[f"n{i:08d}" for i in range(NUM_CLASSES)], progress_every=1e9)
        prepare_s = time.perf_counter() - t0
        dataset = StreamedDataset.open(manifest.root)
        torch_dir = tmp / "manual"
        # the two sides alternate, `repeats` times, and the medians are reported: on a shared machine the load
        # changes between runs, and alternating spreads that over both sides
        runs = {"kdjax_1_thread": lambda: rates(timed_ours(dataset, 1, passes)),
                "torchvision_0_workers": lambda: rates(timed_torchvision(args.torch_python, torch_dir, 0, passes))}
        if not args.quick and cores > 1:
            runs[f"kdjax_{cores}_threads"] = lambda: rates(timed_ours(dataset, cores, passes))
            runs[f"torchvision_{cores}_workers"] = lambda: rates(
                timed_torchvision(args.torch_python, torch_dir, cores, passes), own_process=False)
        samples = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                samples[name].append(run())
        rows = {name: _median_row(rows_) for name, rows_ in samples.items()}
    per_core_ratio = rows["kdjax_1_thread"]["images_per_cpu_s"] / rows["torchvision_0_workers"]["images_per_cpu_s"]
    import grain
    import PIL

    result = {"bench": "input_pipeline", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "quick": args.quick, "machine": {"platform": platform.platform(), "processor":
        cpu_model(), "cores": cores, "python": platform.python_version()},
        "versions": {"grain": getattr(grain, "__version__", "?"), "pillow": PIL.__version__,
                     "torch": rows["torchvision_0_workers"].get("torch")},
        "files": files, "batch": BATCH, "passes": passes, "repeats": args.repeats, "prepare_s": prepare_s, "rows": rows,
        "per_core_ratio_vs_torchvision": per_core_ratio}
    print(f"{'pipeline':<26}{'images/s':>10}{'images/cpu-s':>14}")
    for name, row in rows.items():
        per_cpu = row["images_per_cpu_s"]
        print(f"{name:<26}{row['images_per_s']:>10.1f}{'-' if per_cpu is None else f'{per_cpu:.1f}':>14}")
    print(f"per core, kdjax / torchvision: {per_core_ratio:.2f}x ({files['images']} JPEGs, {files['mean_kb']:.0f} KB "
          f"mean; prepare {prepare_s:.1f} s)")
    write_json(result, output_path("input_pipeline", "cpu", args.quick))


def _median_row(rows: list) -> dict:
    """The run with the median images per CPU-second (per wall second where CPU time is not available), with the
    spread of all runs."""
    key = "images_per_cpu_s" if rows[0]["images_per_cpu_s"] is not None else "images_per_s"
    ordered = sorted(rows, key=lambda r: r[key])
    return {**ordered[len(ordered) // 2], "runs": len(rows), f"{key}_all": [round(r[key], 1) for r in rows]}


if __name__ == "__main__":
    main()
