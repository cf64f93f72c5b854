"""Run directories (issue 13): one owner, never reused silently, stale temps of dead processes removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mlx_mistral.core import checkpoints
from mlx_mistral.core.rundir import check_writable, claim


def test_fresh_and_empty_folders_are_used(tmp_path):
    with claim(tmp_path / "new" / "run") as lock:
        assert lock.overwritten == [] and (tmp_path / "new" / "run" / ".lock").exists()
    (tmp_path / "empty").mkdir()
    claim(tmp_path / "empty").release()


def test_a_run_is_not_reused_without_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000009").mkdir(parents=True)
    (run / "config.yaml").write_text("steps: 9\n")
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"not empty \(checkpoints, config.yaml, metrics.jsonl\).*--resume.*--overwrite"):
        claim(run)
    claim(run, resume=True).release()  # continuing it is fine
    with claim(run, overwrite=True) as lock:  # and --overwrite says what it removed
        assert lock.overwritten == ["checkpoints", "config.yaml", "metrics.jsonl"]
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_overwrite_never_empties_a_folder_with_the_users_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("steps: 9\n")
    (run / "my-notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="files no run writes.*my-notes.txt|my-notes.txt.*never emptied"):
        claim(run, overwrite=True)
    assert (run / "my-notes.txt").read_text() == "mine" and (run / "config.yaml").exists()


def test_resume_needs_a_run_and_contradicts_overwrite(tmp_path):
    with pytest.raises(ValueError, match="holds no run"):
        claim(tmp_path / "nothing", resume=True)
    with pytest.raises(ValueError, match="contradict"):
        claim(tmp_path / "x", resume=True, overwrite=True)


def test_out_under_a_regular_file_is_refused_before_anything(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_writable(tmp_path / "file" / "run")
    with pytest.raises(ValueError, match="is a file"):
        claim(tmp_path / "file")


def test_stale_temps_of_dead_processes_are_removed(tmp_path):
    run = tmp_path / "run"
    stale = [run / "checkpoints" / ".step-0000004.tmp12345", run / ".adapters.safetensors.999.safetensors",
             run / ".config.yaml.4242.tmp"]
    stale[0].mkdir(parents=True)
    (stale[0] / "weights.safetensors").write_bytes(b"x" * 1000)
    for p in stale[1:]:
        p.write_bytes(b"partial")
    (run / "config.yaml").write_text("steps: 9\n")
    with claim(run, resume=True) as lock:
        assert sorted(lock.removed_temps) == sorted(str(p.relative_to(run)) for p in stale)
    assert not any(p.exists() for p in stale) and (run / "config.yaml").exists()


HOLD = """
import sys, time
from mlx_mistral.core.rundir import claim
lock = claim(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_second_process_is_refused_and_a_killed_owner_leaves_no_stuck_lock(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"in use by another training process \(pid {holder.pid}"):
            claim(run)
        holder.send_signal(signal.SIGKILL)  # kill -9: no clean-up code runs
        holder.wait(timeout=30)
        time.sleep(0.1)
        claim(run).release()  # the kernel dropped the lock with the process
    finally:
        if holder.poll() is None:
            holder.kill()


def test_rotation_keeps_the_newest_verified_checkpoint(tmp_path):
    def write(step, verified):
        path = checkpoints.write(tmp_path, step, {"step": step}, lambda d: None, keep=2)
        if verified:
            checkpoints.mark_verified(path)

    write(1, True)
    write(2, False)
    write(3, False)  # keep=2 would drop step 1, but it is the only verified one
    assert [p.name for p in checkpoints.complete(tmp_path)] == ["step-0000001", "step-0000002", "step-0000003"]
    assert checkpoints.latest_verified(tmp_path).name == "step-0000001"
    assert [p.name for p in checkpoints.drop_unverified(tmp_path)] == ["step-0000002", "step-0000003"]
    assert [p.name for p in checkpoints.complete(tmp_path)] == ["step-0000001"]


def test_damaged_state_json_is_named(tmp_path):
    path = checkpoints.write(tmp_path, 1, {"step": 1, "global_batch": 4}, lambda d: None, keep=2)
    (path / "state.json").write_text('{"step": 1, "glob')
    with pytest.raises(ValueError, match=r"step-0000001/state.json cannot be read.*delete"):
        checkpoints.read_state(path, 4)
