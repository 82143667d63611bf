"""Helpers shared by the training tests: load a config file, run launch.py in a subprocess."""
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent


def load_config(name: str, arg: str = ""):
    """A task's default config with the colon argument ``arg`` applied (``kdjax.configs.task_config``)."""
    from kdjax import configs
    return configs.task_config(name, arg or None)


def launch_env(devices: int = 1, **extra) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", KDJAX_PLUGINS="tiny_models",
               PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO / "src"), env.get("PYTHONPATH", "")]),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    env.update(extra)
    return env


def launch(config: str, workdir, *overrides, devices: int = 1, timeout: int = 600, check: bool = True, **env):
    cmd = [sys.executable, str(REPO / "launch.py"), f"--config={REPO / 'configs' / config}",
           f"--workdir={workdir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(devices, **env), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def spawn(config: str, workdir, *overrides, devices: int = 1, **env):
    cmd = [sys.executable, str(REPO / "launch.py"), f"--config={REPO / 'configs' / config}",
           f"--workdir={workdir}", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=launch_env(devices, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def kill_after(proc, marker, timeout: float = 300, jitter: float = 0.0):
    """SIGKILL ``proc`` once the file ``marker`` (a checkpoint's ``commit_success.txt``) exists, after a random
    further wait of up to ``jitter`` seconds; fails if the run ended before it could be killed."""
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if jitter:
        time.sleep(random.uniform(0.0, jitter))
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
