"""JAX's persistent compilation cache shared by runs: a second run of the same programs reads them all from the
cache (counted from JAX's own events) and computes exactly the same result."""
import json
import subprocess
import sys

from helpers import launch_env


def test_a_second_run_compiles_nothing_and_agrees(tmp_path):
    results = []
    for seed_dir in ("a", "b"):
        proc = subprocess.run([sys.executable, "-m", "kdjax", "teacher", "--config.model=tiny_cnn",
                               "--config.dataset=digits", "--config.image_size=8", "--config.epochs=1",
                               "--config.batch_size=32", f"--config.compile_cache_dir={tmp_path / 'cache'}",
                               f"--workdir={tmp_path / seed_dir}"], env=launch_env(), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(json.loads((tmp_path / seed_dir / "results.json").read_text()))
    cold, warm = results
    assert cold["compile_cache"]["misses"] > 0 and cold["compile_cache"]["hits"] == 0
    assert warm["compile_cache"] == {"hits": cold["compile_cache"]["misses"], "misses": 0}
    assert warm["test_loss"] == cold["test_loss"] and warm["top1"] == cold["top1"]
    # the run's compile figures count every program it compiled or loaded, not only its training chunk's
    assert cold["programs"] == cold["compile_cache"]["misses"] and warm["programs"] == warm["compile_cache"]["hits"]
    assert cold["compile_s"] > 0
    assert (tmp_path / "cache" / "cpu").is_dir()  # keyed by the device kind
