"""kdjax.sweep.slurm without a cluster: the jobs and dependencies of the paper grid, where each run stands from the
record and squeue's answer, sbatch options, the shared-filesystem check, the lock takeover after a requeue, and a
job's failure path. (The real cluster: tests/tasks/test_slurm_sweep.py.)"""
import json
import os
import socket

import pytest

from helpers import load_config
from kdjax import sweep
from kdjax.sweep import slurm
from kdjax.sweep.grid import Run


def settings(**fields):
    config = load_config("sweep").slurm
    for key, value in fields.items():
        config[key] = value
    return config


def test_the_paper_grid_is_290_jobs_in_38_sbatch_calls_each_waiting_on_exactly_its_inputs(tmp_path, capsys):
    runs = sweep.plan(load_config("sweep"), str(tmp_path))
    groups = slurm.dry_run(str(tmp_path), runs, settings(partition="gpu"), 2)
    assert sum(len(g.runs) for g in groups) == 290 and len(groups) == 38
    assert [len(g.runs) for g in groups[:11]] == [5] + [3] * 5 + [54, 54, 54, 54, 27]
    assert all(len(g.runs) == 1 for g in groups[11:])  # each CutMixPick (S. ent.) T. stddev waits on its own student
    placeholder = {r.workdir: j for g in groups for r, j in zip(g.runs, g.job_ids)}
    inputs = sweep.executor.inputs_of(runs)
    for group in groups:
        for run in group.runs:
            assert sorted(group.dependency) == sorted(placeholder[p.workdir] for p in inputs[run.workdir])
    out = capsys.readouterr().out
    assert "would submit 290 job(s) in 38 sbatch call(s)" in out and "--partition=gpu --time=1440" in out
    assert "sbatch #2: tstddev, array of 3 (%64), afterok:#1_0, --kill-on-invalid-dep=yes" in out
    assert not os.listdir(tmp_path)  # nothing written


def test_given_teachers_leave_the_students_without_dependency(tmp_path):
    config = load_config("sweep", "pairs=resnet56:resnet20,augs=cutmix+cutmix_pick_s,seeds=0+1,datasets=digits")
    config.teacher_checkpoints.resnet56 = "/t/r56"
    runs = sweep.plan(config, str(tmp_path))
    groups = slurm.SlurmSweep(str(tmp_path), runs, settings(), 2).plan_groups(
        slurm.assess(runs, sweep.executor.inputs_of(runs), slurm.Record(str(tmp_path)), 2, states={}))
    assert [(g.task, len(g.runs), g.dependency) for g in groups] == [
        ("tstddev", 2, []), ("distill", 4, []), ("tstddev", 1, ["#2_2"]), ("tstddev", 1, ["#2_3"])]


def _chain(tmp_path):
    """teacher -> student -> T. stddev scored by the student, plus a second student."""
    t = Run("teacher", str(tmp_path / "t"), (), 0)
    s1 = Run("distill", str(tmp_path / "s1"), (("teacher_checkpoint", t.workdir),), 2)
    s2 = Run("distill", str(tmp_path / "s2"), (("teacher_checkpoint", t.workdir),), 2)
    ts = Run("tstddev", str(tmp_path / "ts"), (("student_checkpoint", s1.workdir),
                                              ("teacher_checkpoint", t.workdir)), 3)
    return [t, s1, s2, ts]


def _job(record, run, job_id, started):
    stdout = os.path.join(record.root, "slurm", job_id, f"{job_id}_0_log.out")
    if started:
        os.makedirs(os.path.dirname(stdout), exist_ok=True)
        open(stdout, "w").close()
    record.add_job(run, job_id, stdout, [])


def test_failed_attempts_count_only_jobs_that_started_and_a_run_that_gave_up_blocks_its_dependants(tmp_path):
    runs = _chain(tmp_path)
    t, s1, s2, ts = runs
    inputs = sweep.executor.inputs_of(runs)
    record = slurm.Record(str(tmp_path))
    for i in range(3):  # the teacher failed three times
        _job(record, t, str(10 + i), started=True)
    _job(record, s1, "20", started=False)  # cancelled by its dependency: never started
    states = slurm.assess(runs, inputs, record, max_retries=2, states={"12": ("FAILED", "NonZeroExitCode"),
                                                                     "20": ("CANCELLED", "DependencyNeverSatisfied")})
    assert [states[r.workdir].status for r in runs] == ["gave_up", "blocked", "blocked", "blocked"]
    assert states[t.workdir].attempts == 3 and states[s1.workdir].attempts == 0
    # one more retry allowed: the teacher is resubmitted and everything waits on its new job
    states = slurm.assess(runs, inputs, record, max_retries=3, states={})
    assert [states[r.workdir].status for r in runs] == ["failed", "new", "new", "new"]
    groups = slurm.SlurmSweep(str(tmp_path), runs, settings(), 3).plan_groups(states)
    assert [(g.task, len(g.runs), g.dependency) for g in groups] == [
        ("teacher", 1, []), ("distill", 2, ["#1"]), ("tstddev", 1, ["#2_0", "#1"])]


def test_a_finished_input_needs_no_dependency_and_a_queued_one_is_waited_on(tmp_path):
    runs = _chain(tmp_path)
    t, s1, s2, ts = runs
    os.makedirs(t.workdir)
    open(os.path.join(t.workdir, "results.json"), "w").write("{}")
    record = slurm.Record(str(tmp_path))
    _job(record, t, "1", started=True)
    _job(record, s1, "2", started=True)
    states = slurm.assess(runs, sweep.executor.inputs_of(runs), record, 2, states={"2": ("RUNNING", "None")})
    assert [states[r.workdir].status for r in runs] == ["done", "active", "new", "new"]
    assert states[s1.workdir].attempts == 0  # a running job is no failed attempt
    groups = slurm.SlurmSweep(str(tmp_path), runs, settings(), 2).plan_groups(states)
    # s2 without dependency (its teacher is finished: its job may be forgotten by SLURM), ts after the running s1
    assert [(g.task, [r.workdir for r in g.runs], g.dependency) for g in groups] == [
        ("distill", [s2.workdir], []), ("tstddev", [ts.workdir], ["2"])]


def test_a_queued_dependant_of_a_resubmitted_run_is_replaced(tmp_path):
    runs = _chain(tmp_path)
    t, s1, s2, ts = runs
    record = slurm.Record(str(tmp_path))
    _job(record, t, "1", started=True)
    _job(record, s1, "2", started=False)
    states = slurm.assess(runs, sweep.executor.inputs_of(runs), record, 2,
                          states={"1": ("FAILED", "NonZeroExitCode"), "2": ("PENDING", "Dependency")})
    groups = slurm.SlurmSweep(str(tmp_path), runs, settings(), 2).plan_groups(states)
    assert [(g.task, len(g.runs)) for g in groups] == [("teacher", 1), ("distill", 2), ("tstddev", 1)]
    assert states[s1.workdir].status == "active"  # submit() scancels job 2 and marks it superseded first


def test_cancelled_jobs_are_not_failures_and_status_reads_the_record_alone(tmp_path, capsys, monkeypatch):
    runs = _chain(tmp_path)
    record = slurm.Record(str(tmp_path))
    record.set_plan(runs, sweep.executor.inputs_of(runs))
    _job(record, runs[0], "7", started=True)
    record.save()
    with open(tmp_path / slurm.CANCELLED, "w") as f:
        json.dump(["7"], f)
    monkeypatch.setattr(slurm.record, "job_states", lambda ids: {})
    monkeypatch.setattr(slurm.record, "sacct_states", lambda ids: {})
    states = slurm.status(str(tmp_path), 2)
    assert [s.status for s in states.values()] == ["cancelled", "new", "new", "new"]
    assert states[runs[0].workdir].attempts == 0
    out = capsys.readouterr().out
    assert "4 runs: 0 finished, 0 running, 0 queued, 0 failed (to resubmit), 1 cancelled, 3 to submit" in out
    with pytest.raises(slurm.SlurmError, match="no SLURM jobs recorded"):
        slurm.status(str(tmp_path / "elsewhere"), 2)


def test_sbatch_options():
    params = slurm.sbatch_parameters(settings(gpus_per_node=0, mem_gb=2.5, account="lab", setup=("module load x",),
                                              additional_parameters=("reservation=r1", "--exclusive")),
                                     "distill", ["12_3", "14"])
    assert "gpus_per_node" not in params and params["mem"] == "2560M" and params["account"] == "lab"
    assert params["setup"] == ["module load x"] and params["job_name"] == "kdjax-distill"
    assert params["additional_parameters"] == {"reservation": "r1", "exclusive": True, "requeue": True,
                                               "dependency": "afterok:12_3:14", "kill-on-invalid-dep": "yes"}
    assert slurm.sbatch_parameters(settings(), "teacher", [])["gpus_per_node"] == 1
    with pytest.raises(ValueError, match="sets --dependency, which the sweep sets itself"):
        slurm.sbatch_parameters(settings(additional_parameters=("dependency=afterany:1",)), "teacher", [])


def test_the_workdir_must_be_on_a_filesystem_the_nodes_share(tmp_path, monkeypatch):
    lines = []
    monkeypatch.setattr(slurm.queue, "filesystem_of", lambda path: "ext4")
    monkeypatch.setattr(slurm.queue, "partition_nodes", lambda p: ["node01", "node02"])
    with pytest.raises(slurm.SlurmError, match="local to this host .* but the jobs run on node01, node02"):
        slurm.check_shared_filesystem(str(tmp_path), None, lines.append)
    monkeypatch.setattr(slurm.queue, "partition_nodes", lambda p: [socket.gethostname()])
    assert "the only node of the partition" in slurm.check_shared_filesystem(str(tmp_path), None, lines.append)
    monkeypatch.setattr(slurm.queue, "filesystem_of", lambda path: "nfs4")
    assert "shared between nodes" in slurm.check_shared_filesystem(str(tmp_path), None, lines.append)
    monkeypatch.setattr(slurm.queue, "filesystem_of", lambda path: "fuse.weird")
    assert "cannot tell" in slurm.check_shared_filesystem(str(tmp_path), None, lines.append)
    assert slurm.filesystem_of("/") is not None


def test_a_restarted_job_takes_over_the_lock_of_its_previous_run_on_another_node(tmp_path):
    from kdjax.workdir import LOCK_FILE
    lock = tmp_path / LOCK_FILE
    holder = {"host": "node07", "pid": 4242, "heartbeat": 0}
    (tmp_path / slurm.STARTS).write_text(json.dumps({"job_id": "5_1", "restart": 0, "host": "node07",
                                                     "pid": 4242}) + "\n")
    lock.write_text(json.dumps(holder))
    assert not slurm.take_over_previous_incarnation(str(tmp_path), "5_1", 0, log=lambda line: None)
    assert not slurm.take_over_previous_incarnation(str(tmp_path), "5_2", 1, log=lambda line: None)
    lock.write_text(json.dumps(dict(holder, pid=99)))  # someone else holds it now
    assert not slurm.take_over_previous_incarnation(str(tmp_path), "5_1", 1, log=lambda line: None)
    lock.write_text(json.dumps(holder))
    assert slurm.take_over_previous_incarnation(str(tmp_path), "5_1", 1, log=lambda line: None)
    assert not lock.exists()


def test_a_failing_job_logs_to_the_run_workdir_and_raises_for_submitit(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "31")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    workdir = tmp_path / "run"
    from kdjax import sweep, tasks
    job = slurm.RunJob(sweep.Run("teacher", str(workdir), (("model", "resnet9"),), 0), tasks.run_command)
    with pytest.raises(RuntimeError, match=r"kdjax teacher failed \(exit status 1\).*unknown model 'resnet9'"):
        job()
    log = (workdir / slurm.LOG).read_text()
    assert log.startswith("[slurm] job 31 (restart 0) on ") and "error: " in log
    assert json.loads((workdir / slurm.STARTS).read_text())["job_id"] == "31"
    assert hasattr(job, "checkpoint")  # submitit requeues a checkpointable job at its time limit


@pytest.mark.parametrize("fields, message", [
    (dict(executor="pbs"), "executor='pbs': choose one of local, slurm"),
    (dict(action="stop"), "action='stop'"),
    (dict(shard="2/2"), "0 <= i < n"),
    (dict(shard="half"), "not of the form i/n"),
    (dict(shard="0/2", executor="slurm"), "use it with executor=local"),
    (dict(action="cancel"), "action=cancel stops the SLURM jobs"),
    (dict(executor="slurm", parallel=2), "drop parallel"),
])
def test_mistaken_modes_are_one_line(fields, message, tmp_path):
    from kdjax.tasks import sweep as sweep_task
    config = load_config("demo")
    for key, value in fields.items():
        config[key] = value
    with pytest.raises(ValueError, match=message):
        sweep_task.run(config, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_a_resubmitted_run_is_freed_of_the_lock_its_ended_job_left(tmp_path):
    from kdjax.workdir import LOCK_FILE
    lock = tmp_path / LOCK_FILE
    (tmp_path / slurm.STARTS).write_text(json.dumps({"job_id": "8", "restart": 0, "host": "node03", "pid": 77}) + "\n")
    lock.write_text(json.dumps({"host": "node03", "pid": 77, "heartbeat": 0}))
    quiet = dict(log=lambda line: None)
    assert not slurm.clear_lock_of_ended_job(str(tmp_path), ["8"], ["8"], **quiet)  # still running
    assert not slurm.clear_lock_of_ended_job(str(tmp_path), ["9"], [], **quiet)  # not this run's job
    assert lock.exists() and slurm.clear_lock_of_ended_job(str(tmp_path), ["8"], [], **quiet)
    assert not lock.exists()


def test_while_waiting_runs_behind_a_cancelled_input_are_not_submitted(tmp_path):
    runs = _chain(tmp_path)
    t, s1, s2, ts = runs
    record = slurm.Record(str(tmp_path))
    _job(record, t, "1", started=True)
    with open(tmp_path / slurm.CANCELLED, "w") as f:
        json.dump(["1"], f)
    states = slurm.assess(runs, sweep.executor.inputs_of(runs), record, 2, states={})
    sweeper = slurm.SlurmSweep(str(tmp_path), runs, settings(), 2)
    assert sweeper.plan_groups(states, resubmit_cancelled=False) == []  # none would find its teacher finished
    assert [g.task for g in sweeper.plan_groups(states)] == ["teacher", "distill", "tstddev"]
