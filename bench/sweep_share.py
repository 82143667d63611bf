"""Do concurrent runs on one accelerator beat one run at a time? Aggregate KD images/s of N ``distill`` runs
started together as separate processes (each with 1/N of the device memory: what ``configs/sweep.py``'s
``parallel=N`` does), against one run alone, measured in the same invocation.

    python bench/sweep_share.py --procs 1,2,4,8          # resnet56 -> resnet20, CutMix, batch 64, synthetic data
    python bench/sweep_share.py --quick                  # CPU smoke run: tiny data, resnet8 -> resnet8

Each run trains ``--epochs`` on synthetic CIFAR-sized data with a random teacher checkpoint written first; its
``results.json`` gives its images/s (compile excluded). Aggregate = sum over the N concurrent runs. The JSON goes to
``bench/results/sweep_share_<device kind>_<date>[_quick].json``.
"""
import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from results_io import output_path, write_json

REPO = pathlib.Path(__file__).resolve().parents[1]


def launch(config: str, workdir: str, overrides, env):
    return subprocess.Popen([sys.executable, str(REPO / "launch.py"), f"--config={REPO / 'configs' / config}",
                             f"--workdir={workdir}", *overrides], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", default="1,2,4")
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--student", default="resnet20")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/sweep_share_<device>_<date>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.teacher, args.student, args.epochs, args.num_train, args.procs = "resnet8", "resnet8", 1, 512, "1,2"
    data = [f"--config.dataset_options.num_train={args.num_train}", "--config.dataset_options.num_test=256",
            "--config.dataset_options.num_classes=100",
            "--config.image_size=" + ("16" if args.quick else "32")]
    root = tempfile.mkdtemp(prefix="kdjax_share_")
    env = dict(os.environ)
    teacher_dir = os.path.join(root, "teacher")
    proc = launch(f"teacher.py:model={args.teacher},dataset=synthetic,epochs=1", teacher_dir,
                  data + ["--config.optim.lr=1e-9"], env)  # the weights barely move; lr must be > 0
    if proc.wait():
        raise SystemExit(f"teacher run failed: {proc.stderr.read()[-2000:]}")
    import jax
    device = jax.devices()[0].device_kind
    rows = []
    for n in [int(v) for v in args.procs.split(",")]:
        run_env = dict(env, XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / n:.3f}", XLA_PYTHON_CLIENT_PREALLOCATE="false")
        workdirs = [os.path.join(root, f"n{n}_{i}") for i in range(n)]
        started = time.time()
        procs = [launch(f"distill.py:teacher={args.teacher},student={args.student},dataset=synthetic,aug=cutmix,"
                        f"epochs={args.epochs},seed={i}", w, data + [f"--config.teacher_checkpoint={teacher_dir}",
                                                                   "--config.eval_every=1000"], run_env)
                 for i, w in enumerate(workdirs)]
        failed = [pr.stderr.read()[-1000:] for pr in procs if pr.wait()]
        if failed:
            raise SystemExit(f"{len(failed)} of {n} runs failed: {failed[0]}")
        per_run = [json.load(open(os.path.join(w, "results.json")))["images_per_s"] for w in workdirs]
        rows.append({"processes": n, "aggregate_images_per_s": sum(per_run), "per_run_images_per_s": per_run,
                     "wall_s": time.time() - started})
        print(f"{n} process(es): aggregate {sum(per_run):,.0f} img/s "
              f"({sum(per_run) / rows[0]['aggregate_images_per_s']:.2f}x one run)", flush=True)
    out = {"device_kind": device, "date": datetime.date.today().isoformat(), "jax": jax.__version__,
           "teacher": args.teacher, "student": args.student, "aug": "cutmix", "batch": 64, "quick": args.quick,
           "rows": rows}
    write_json(out, args.out or output_path("sweep_share", device, args.quick))


if __name__ == "__main__":
    main()
