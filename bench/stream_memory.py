"""Host memory of the streamed source: RSS while streaming E epochs of an N-image dataset (N in 256, 1024; E in 1, 3
and 8 for the larger), to check that it grows with neither (the records are read on demand; only the shuffled
order, 8 bytes per example, scales with N). Reports the peak RSS and the RSS at every epoch end.

    python bench/stream_memory.py            # 224 px, batch 64, 2 read threads, 4 batches prefetched

Each (N, E) runs in a fresh process (peak RSS is per process). Writes bench/results/stream_memory_cpu_<date>.json.
"""
import json
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from results_io import output_path, write_json  # noqa: E402

CHILD = r"""
import json, resource, sys
from kdjax.data import epochs
from kdjax.data.streamed import ProcessShare, StreamedDataset, host_iterator
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
root, num_epochs = sys.argv[1], int(sys.argv[2])
dataset = StreamedDataset.open(root)
plan = epochs.make_plan(dataset.num_train, 64, 1)
it = host_iterator(dataset.train_steps(plan, num_epochs, seed=0, share=ProcessShare()), threads=2, buffer=4)
after_open = rss_mib()
per_epoch = []
for step in range(num_epochs * plan.steps_per_epoch):
    next(it)
    if (step + 1) % plan.steps_per_epoch == 0:
        per_epoch.append(round(rss_mib(), 1))
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_after_open_mib": after_open, "rss_at_epoch_ends_mib": per_epoch,
                  "steps": num_epochs * plan.steps_per_epoch}))
"""


def main():
    from input_pipeline import NUM_CLASSES, write_tree
    from kdjax.data.streamed import prepare_dataset

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for num_images in (256, 1024):
            base = pathlib.Path(tmp) / str(num_images)
            write_tree(base / "manual", num_images)
            manifest = prepare_dataset("imagenet", base / "manual", base / "data",
                                       classes=[f"n{i:08d}" for i in range(NUM_CLASSES)], progress_every=1e9)
            for num_epochs in (1, 3) if num_images == 256 else (1, 3, 8):
                out = subprocess.run([sys.executable, "-c", CHILD, str(manifest.root), str(num_epochs)],
                                     capture_output=True, text=True, check=True)
                row = {"images": num_images, "epochs": num_epochs, **json.loads(out.stdout.strip().splitlines()[-1])}
                print(row, flush=True)
                rows.append(row)
    write_json({"bench": "stream_memory", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "rows": rows}, output_path("stream_memory", "cpu", False))


if __name__ == "__main__":
    main()
