"""Two JAX processes (CPU, gloo) stream a prepared dataset: each reads only its half of every global batch, and the
global arrays assembled by make_array_from_process_local_data equal, row for row, the batches one process reads;
evaluation over both covers every test image once."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
from conftest import REPO

import streamed_inputs as fab
from kdjax.data import epochs
from kdjax.data.streamed import ProcessShare, StreamedDataset, host_iterator, prepare_dataset

SIZE = 16
CHILD = r"""
import json, sys
import jax, jax.numpy as jnp
from kdjax import parallel
parallel.maybe_initialize_distributed()
from kdjax.data import epochs
from kdjax.data.streamed import DeviceIterator, StreamedDataset, host_iterator
mesh = parallel.make_mesh()
data = StreamedDataset.open(sys.argv[1], image_size=%d)
plan = epochs.make_plan(data.num_train, 8, mesh.size)
# an order-sensitive exact digest of each global batch: sum over rows of (row + 1) * (pixel sum, label, index)
@jax.jit
def digest(batch):
    weight = jnp.arange(1, batch["images"].shape[0] + 1, dtype=jnp.int32)
    pixels = batch["images"].astype(jnp.int32).sum(axis=(1, 2, 3))
    return jnp.stack([(weight * pixels).sum(), (weight * batch["labels"]).sum(), (weight * batch["indices"]).sum()])
train = [digest(b).tolist() for b, _ in zip(DeviceIterator(host_iterator(data.train_steps(plan, 2, seed=4),
                                                                         threads=2), mesh),
                                            range(2 * plan.steps_per_epoch))]
@jax.jit
def covered(batch):
    return jnp.stack([batch["mask"].sum(), jnp.where(batch["mask"], batch["indices"], 0).sum()])
evaluation = [covered(b).tolist() for b in DeviceIterator(host_iterator(data.eval_steps(4), threads=2), mesh)]
print("RESULT " + json.dumps({"process": jax.process_index(), "devices": mesh.size, "train": train,
                              "eval": evaluation}))
""" % SIZE


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _digest(batch):
    weight = np.arange(1, batch["images"].shape[0] + 1, dtype=np.int64)
    pixels = batch["images"].astype(np.int64).sum(axis=(1, 2, 3))
    return [int((weight * pixels).sum()), int((weight * batch["labels"]).sum()), int((weight * batch["indices"]).sum())]


def test_two_processes_assemble_the_single_process_batches(tmp_path):
    fab.write_tars(tmp_path / "manual", fab.make_images(seed=4))
    manifest = prepare_dataset("imagenet", tmp_path / "manual", tmp_path / "data", classes=fab.classes(),
                               records_per_shard=16, workers=1, progress_every=0)
    data = StreamedDataset.open(manifest.root, image_size=SIZE)
    plan = epochs.make_plan(data.num_train, 8, 2)
    steps = data.train_steps(plan, 2, seed=4, share=ProcessShare(0, 1))
    it = host_iterator(steps, threads=2)
    expected = [_digest(next(it)) for _ in range(len(steps))]

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "JAX_PLATFORMS": "cpu",
           "KDJAX_COORDINATOR": f"localhost:{port}", "KDJAX_NUM_PROCESSES": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(manifest.root)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "KDJAX_PROCESS_ID": str(p)})
             for p in range(2)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]
        outputs.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    for result in outputs:
        assert result["devices"] == 2
        assert result["train"] == expected
        assert sum(count for count, _ in result["eval"]) == data.num_test
        assert sum(total for _, total in result["eval"]) == sum(range(data.num_test))
