"""Where the benchmarks write: ``bench/results/<bench>_<device kind>_<date>[_quick].json``."""
import datetime
import json
import pathlib
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
