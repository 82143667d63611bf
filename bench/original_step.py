"""The original repository's KD + CutMix training step (MingSun-Tse/Good-DA-in-KD, PyTorch), timed on CPU.

Run with a Python that has torch (never imported by kdjax itself); ``--original`` names a clone of the original:

    PYTHON_WITH_TORCH bench/original_step.py --original /path/to/Good-DA-in-KD --windows 3 --steps 20
    ... --serve      # the timing server bench/kd_step.py --vs-original drives (one line per window, below)
    ... --profile    # torch.profiler's table of one window (operators by self CPU time)

The step is ``helper/loops.py:train_distill``'s body for ``--distill kd --mix_mode cutmix --lw_mix [1,0,1]
--t_output_as_target_for_input_mix -r 0.1 -a 0.9`` (the paper's scripts), built from the original's own modules:
``models.model_dict`` (student in train mode, teacher in eval mode), ``distiller_zoo.DistillKL(4, 4)``,
``helper.loops.get_mixed_input('cutmix', ...)`` and SGD(lr 0.05, momentum 0.9, weight decay 5e-4) as
``train_student.py`` builds it: s(x), t(x) without grad, CutMix, t(x') without grad, s(x'), loss = 0.1 CE + 0.9 (KL_4
on x + KL_4 on x'), backward, SGD step, plus the ``.item()`` reads of its loss line. Batches are normalised float
tensors made once (the original's crop + flip run in DataLoader workers: not timed here, in favour of the original).

To run the CUDA-only code on CPU, ``Tensor.cuda`` is the identity and ``np.int`` (removed from NumPy 1.24, read
by ``rand_bbox``) is ``int``; nothing else of the original is changed.

Server protocol (``--serve``): after building and one warm-up step it prints ``ready {json}`` (versions, threads);
then for each stdin line ``time N`` it runs N steps and prints ``seconds S cpu C`` (wall and process CPU seconds of
the N steps); ``quit`` or end of input ends it.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim

MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)  # dataset/cifar100.py


def shim_cuda_only_code():
    """The two changes that let the original's CUDA-only step run on CPU (module docstring)."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    if not hasattr(np, "int"):
        np.int = int


class OriginalStep:
    """The original's KD + CutMix step on resnet-style CIFAR models, built from the clone at ``original``."""

    def __init__(self, original, teacher, student, batch, image_size=32, num_classes=100, pool=8, seed=0):
        sys.path.insert(0, os.path.abspath(original))
        shim_cuda_only_code()
        from models import model_dict  # noqa: PLC0415  (the original's modules, from its clone)
        from distiller_zoo import DistillKL  # noqa: PLC0415
        from helper.loops import get_mixed_input  # noqa: PLC0415

        torch.manual_seed(seed)
        np.random.seed(seed)
        self.get_mixed_input = get_mixed_input
        self.model_s = model_dict[student](num_classes=num_classes).train()
        self.model_t = model_dict[teacher](num_classes=num_classes).eval()
        self.criterion_cls = nn.CrossEntropyLoss()
        self.criterion_div = DistillKL(4.0, 4.0)
        self.optimizer = optim.SGD(self.model_s.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        # the attributes of ``opt`` that cutmix reads (option.py defaults)
        self.opt = argparse.Namespace(ceiling_ratio=-1, floor_ratio=-1, bbox="rand_bbox", n_cls=num_classes,
                                      check_cutmix_label=False)
        gen = torch.Generator().manual_seed(seed)
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        self.inputs = [(torch.rand(batch, 3, image_size, image_size, generator=gen) - mean) / std
                       for _ in range(pool)]
        self.targets = [torch.randint(0, num_classes, (batch,), generator=gen) for _ in range(pool)]
        self.batch, self.i = batch, 0

    def step(self):
        """One training step; returns its loss (read with .item(), as the original's loss line does)."""
        x, target = self.inputs[self.i % len(self.inputs)], self.targets[self.i % len(self.targets)]
        self.i += 1
        logit_s = self.model_s(x)
        with torch.no_grad():
            logit_t = self.model_t(x)
        input_mix, *_ = self.get_mixed_input("cutmix", x, target, logit_t, logit_s.detach(), self.model_t,
                                             self.model_s, self.opt)
        loss_cls = self.criterion_cls(logit_s, target)
        loss_div = self.criterion_div(logit_s, logit_t.detach())
        with torch.no_grad():
            input_mix_logit_t = self.model_t(input_mix)
        input_mix_logit_s = self.model_s(input_mix)
        loss_mix = self.criterion_div(input_mix_logit_s, input_mix_logit_t.detach())
        total = 0.1 * loss_cls + 0.9 * (loss_div + loss_mix)
        for value in (loss_cls, loss_div, loss_mix, total):
            value.item()
        self.optimizer.zero_grad()
        total.backward()
        self.optimizer.step()
        return total.item()

    def time(self, steps):
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        return time.perf_counter() - t0


def versions():
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "mkldnn": bool(torch.backends.mkldnn.is_available()), "python": sys.version.split()[0]}


def serve(runner):
    runner.step()  # warm-up: first-call allocations and oneDNN primitive creation
    print("ready " + json.dumps(versions()), flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        if command[0] != "time" or len(command) != 2 or not command[1].isdigit():
            print(f"error: unknown command {line.strip()!r} (expected 'time N' or 'quit')", flush=True)
            continue
        cpu = time.process_time()
        seconds = runner.time(int(command[1]))
        print(f"seconds {seconds:.6f} cpu {time.process_time() - cpu:.6f}", flush=True)


def profile(runner, steps):
    from torch.profiler import ProfilerActivity, profile as torch_profile  # noqa: PLC0415

    runner.time(2)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds = runner.time(steps)
    print(f"{steps} steps in {seconds:.3f} s ({runner.batch * steps / seconds:.1f} img/s, under the profiler)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--original", required=True, help="a clone of MingSun-Tse/Good-DA-in-KD")
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--student", default="resnet20")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--steps", type=int, default=20, help="steps per window (standalone and --profile)")
    p.add_argument("--windows", type=int, default=3, help="windows (standalone), median reported")
    p.add_argument("--serve", action="store_true", help="timing server for bench/kd_step.py --vs-original")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of one --steps window")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runner = OriginalStep(args.original, args.teacher, args.student, args.batch, args.image_size, args.num_classes)
    if args.serve:
        return serve(runner)
    if args.profile:
        return profile(runner, args.steps)
    runner.time(2)
    windows = [runner.time(args.steps) for _ in range(args.windows)]
    median = statistics.median(windows)
    print(json.dumps({**versions(), "steps": args.steps, "window_s": windows,
                      "img_per_s": args.batch * args.steps / median}))


if __name__ == "__main__":
    main()
