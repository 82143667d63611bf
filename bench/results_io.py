"""Where the benchmarks write: ``bench/results/<bench>_<device kind>_<date>[_quick].json``; and the machine facts
they record."""
import datetime
import json
import os
import pathlib
import platform
import re

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def output_path(bench: str, device_kind: str, quick: bool) -> pathlib.Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-") or "unknown"
    return RESULTS_DIR / f"{bench}_{slug}_{datetime.date.today().isoformat()}{'_quick' if quick else ''}.json"


def write_json(result: dict, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return path


# The Python with torch (and torchvision) that the side-by-side benchmarks start as a child process when no
# --torch-python is given; torch is never a dependency of kdjax itself.
TORCH_PYTHON_ENV = "KDJAX_TORCH_PYTHON"


def default_torch_python():
    """--torch-python's default: the ``KDJAX_TORCH_PYTHON`` environment variable, else None."""
    return os.environ.get(TORCH_PYTHON_ENV) or None


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere what ``platform`` says), for the record."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
