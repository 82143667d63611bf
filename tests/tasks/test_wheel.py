"""kdjax as a user installs it: a built wheel in a fresh virtual environment, run from outside the checkout."""
import json
import os
import pathlib
import site
import subprocess
import sys


from helpers import REPO


def _venv_with_wheel(tmp_path) -> pathlib.Path:
    """A --system-site-packages venv holding the wheel (installed with --no-deps). When the tests themselves run
    in a venv, its site-packages are added with a .pth line (directories only: its editable-install hooks are
    not run), so the dependencies come from there and nothing is downloaded."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("kdjax-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    inner = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           check=True, capture_output=True, text=True).stdout.strip()
    (pathlib.Path(inner) / "outer_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return venv


def test_wheel_runs_a_sweep_to_its_report_outside_the_checkout(tmp_path):
    venv = _venv_with_wheel(tmp_path)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KDJAX_PLUGINS")}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import kdjax; print(kdjax.__file__)"], cwd=cwd,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert not pathlib.Path(where).resolve().is_relative_to(REPO.resolve()), where

    listing = subprocess.run([str(venv / "bin" / "kdjax"), "--help"], cwd=cwd, env=env, capture_output=True,
                             text=True, timeout=120)
    assert listing.returncode == 0 and "sweep" in listing.stdout

    proc = subprocess.run(
        [str(venv / "bin" / "kdjax"), "sweep", "--workdir=out", "--config.pairs=resnet8:resnet8",
         "--config.augs=identity,cutmix_pick_s", "--config.seeds=0", "--config.datasets=synthetic",
         "--config.optional_datasets=", "--config.dataset_options.num_train=128",
         "--config.dataset_options.num_test=64", "--config.image_size=8", "--config.batch_size=64",
         "--config.epochs=1", "--config.teacher_epochs=1", "--config.tstddev_epochs=1", "--config.eval_every=1"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = cwd / "out"
    assert (out / "report.md").exists() and (out / "summary.csv").exists()
    for aug in ("identity", "cutmix_pick_s"):
        record = json.loads((out / "resnet8-resnet8" / aug / "seed0" / "results.json").read_text())
        assert record["aug"] == aug and 0.0 <= record["top1"] <= 1.0


def test_python_m_kdjax_runs_from_the_folder_that_holds_a_clone_named_kdjax(tmp_path):
    """A clone is usually a folder named kdjax; started from the folder above it, Python sees that folder as a
    namespace package ``kdjax`` (it has configs/, no __init__.py). The src layout keeps the installed package first:
    an editable install of it is a plain path entry, and a regular package wins over a namespace folder."""
    import shutil
    clone = tmp_path / "kdjax"
    clone.mkdir()
    for name in ("configs", "tests", "bench", "docs"):
        (clone / name).mkdir()
    shutil.copy(REPO / "configs" / "teacher.py", clone / "configs" / "teacher.py")
    shutil.copy(REPO / "launch.py", clone / "launch.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "kdjax", "teacher", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kdjax teacher: train a teacher" in proc.stdout
