"""bench/vs_original.py (``bench/kd_step.py --vs-original``): the interleaving, the ratios and the skip lines,
without torch and without timing anything (fake clocks)."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import vs_original  # noqa: E402


def fake_side(name, log, wall, cpu):
    def window(steps):
        log.append((name, steps))
        return wall, cpu
    return window


def test_windows_alternate_which_side_goes_first():
    log = []
    pairs = vs_original.interleaved_windows(fake_side("a", log, 2.0, 1.0), fake_side("b", log, 3.0, 3.0), 7, 4,
                                            load=lambda: 1.5)
    assert log == [("a", 7), ("b", 7), ("b", 7), ("a", 7), ("a", 7), ("b", 7), ("b", 7), ("a", 7)]
    assert [p["order"] for p in pairs] == ["ab", "ba", "ab", "ba"]
    assert pairs[0] == {"a_s": 2.0, "b_s": 3.0, "a_cpu_s": 1.0, "b_cpu_s": 3.0, "order": "ab", "load": [1.5, 1.5]}


def test_ratio_is_the_median_of_per_pair_speed_ratios():
    # kdjax (a) twice as fast as the original (b) in two pairs, four times in one: median 2, spread [2, 4]
    pairs = [{"a_s": 1.0, "b_s": 2.0, "a_cpu_s": 1.0, "b_cpu_s": 1.0, "load": [3.0, 4.0]},
             {"a_s": 0.5, "b_s": 2.0, "a_cpu_s": 1.0, "b_cpu_s": 3.0, "load": [4.0, 2.0]},
             {"a_s": 2.0, "b_s": 4.0, "a_cpu_s": 2.0, "b_cpu_s": 5.0, "load": [None, None]}]
    s = vs_original.ratio_summary(pairs, batch=64, steps=10)
    assert s["ratio"] == pytest.approx(2.0) and (s["ratio_min"], s["ratio_max"]) == (2.0, 4.0)
    assert s["cpu_ratio"] == pytest.approx(2.5)  # CPU ratios 1, 3, 2.5
    assert s["kdjax_img_per_s"] == pytest.approx(640 / 1.0) and s["original_img_per_s"] == pytest.approx(640 / 2.0)
    assert (s["load_min"], s["load_max"]) == (2.0, 4.0)
    line = vs_original.summary_line(s, "resnet56", "resnet20", 64, "float32")
    assert "kdjax / original = 2.00x [2.00, 4.00] over 3 interleaved pairs" in line and "load average 2.0-4.0" in line


def test_skip_lines_name_what_is_missing_and_the_option(tmp_path):
    assert "--original DIR" in vs_original.skip_reason(None, "/usr/bin/python3")
    assert "is not a clone" in vs_original.skip_reason(str(tmp_path), "/usr/bin/python3")
    for f in vs_original.ORIGINAL_FILES:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("")
    assert "--torch-python" in vs_original.skip_reason(str(tmp_path), None)
    assert "does not exist" in vs_original.skip_reason(str(tmp_path), str(tmp_path / "no-python"))
    assert vs_original.skip_reason(str(tmp_path), sys.executable) == ""
    for reason in (vs_original.skip_reason(None, None), vs_original.skip_reason(str(tmp_path), None)):
        assert reason.startswith("original step not timed: ") and "\n" not in reason


def test_server_protocol_against_a_stand_in_process(tmp_path):
    """The client side of original_step.py --serve, driven against a stand-in that speaks the same lines."""
    stand_in = tmp_path / "serve.py"
    stand_in.write_text("import sys\nprint('ready {\"torch\": \"none\", \"threads\": 1}', flush=True)\n"
                        "for line in sys.stdin:\n"
                        "    if line.strip() == 'quit': break\n"
                        "    n = int(line.split()[1]); print(f'seconds {n * 0.5} cpu {n * 0.25}', flush=True)\n")
    server = vs_original.OriginalServer([sys.executable, str(stand_in)])
    try:
        assert server.ready() == {"torch": "none", "threads": 1}
        assert server.time(4) == (2.0, 1.0)
    finally:
        server.close()
    assert server.proc.returncode == 0


def test_server_command_names_the_clone_and_the_pair():
    command = vs_original.original_command("/py", "/clone", "resnet56", "resnet20", 64, 32, 100, threads=1)
    assert command[:3] == ["/py", str(vs_original.RUNNER), "--serve"]
    assert " ".join(command[3:]) == ("--original /clone --teacher resnet56 --student resnet20 --batch 64 "
                                     "--image-size 32 --num-classes 100 --threads 1")
