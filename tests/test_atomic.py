"""Atomic writers: a new version replaces the old whole; a failure mid-write leaves the old
version and no temporary file or folder."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from conftest import CODE
from xray.atomic import StagedFolder, atomic_file, atomic_folder, owner_tag, remove_orphans, write_json_atomic, write_text_atomic


def test_writers_replace_the_whole_file_with_usual_permissions(tmp_path):
    path = tmp_path / "out" / "a.md"  # the folder is created
    write_text_atomic(str(path), "one\nlonger first version\n")
    write_text_atomic(str(path), "two\n")
    assert path.read_text() == "two\n"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask  # not mkstemp's 0600
    write_json_atomic(str(tmp_path / "out" / "m.json"), {"b": 1, "a": [1.5, None], "when": tmp_path})
    assert (tmp_path / "out" / "m.json").read_text() == (
        '{\n  "b": 1,\n  "a": [\n    1.5,\n    null\n  ],\n  "when": "%s"\n}\n' % tmp_path)
    assert sorted(os.listdir(tmp_path / "out")) == ["a.md", "m.json"]


def test_failure_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(str(path), {"accuracy": 0.5})
    # json.dump has written the first key when it meets a key it cannot write.
    with pytest.raises(TypeError):
        write_json_atomic(str(path), {"accuracy": 0.9, ("not", "a", "string"): 1})
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(str(path), "half \udc80 written")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_file(str(path)) as f:
            f.write(b"partial bytes")
            raise RuntimeError("interrupted")
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_atomic_folder_replaces_or_keeps_the_whole_folder(tmp_path):
    dest = tmp_path / "model"
    with atomic_folder(str(dest)) as tmp:
        assert not os.path.exists(tmp) and os.path.dirname(tmp) == str(tmp_path)
        os.makedirs(os.path.join(tmp, "stages"))
        (tmp_path / os.path.basename(tmp) / "stages" / "one").write_text("1")
    assert os.listdir(dest / "stages") == ["one"]

    with pytest.raises(RuntimeError):
        with atomic_folder(str(dest)) as tmp:
            os.makedirs(os.path.join(tmp, "stages"))
            raise RuntimeError("writer failed")
    assert os.listdir(dest / "stages") == ["one"] and os.listdir(tmp_path) == ["model"]

    with atomic_folder(str(dest)) as tmp:
        os.makedirs(os.path.join(tmp, "other"))
    assert os.listdir(dest) == ["other"] and os.listdir(tmp_path) == ["model"]


def test_a_staged_folder_replaces_the_whole_folder_or_nothing(tmp_path):
    dest = tmp_path / "results" / "exp"
    first = StagedFolder(str(dest))
    with open(os.path.join(first.path, "metrics.json"), "w") as f:
        f.write("first")
    os.mkdir(os.path.join(first.path, "model"))
    first.commit()
    assert sorted(os.listdir(dest)) == ["metrics.json", "model"]

    second = StagedFolder(str(dest))  # a run that writes its model, then fails (or is killed)
    os.mkdir(os.path.join(second.path, "model"))
    assert sorted(os.listdir(dest)) == ["metrics.json", "model"] and (dest / "metrics.json").read_text() == "first"
    second.discard()
    assert os.listdir(tmp_path / "results") == ["exp"]  # no staging folder left

    third = StagedFolder(str(dest))
    with open(os.path.join(third.path, "metrics.json"), "w") as f:
        f.write("third")
    third.commit()
    assert os.listdir(dest) == ["metrics.json"] and (dest / "metrics.json").read_text() == "third"  # nothing old
    assert os.listdir(tmp_path / "results") == ["exp"]

    never = StagedFolder(str(tmp_path / "other" / "exp"))  # failed before writing anything
    never.discard()
    assert not (tmp_path / "other").exists()


# --------------------------------------------------------------------------- what killed runs leave


def test_remove_orphans_takes_only_temporaries_of_dead_owners(tmp_path):
    host, boot, pid, start = owner_tag().split(".")
    dead = f".tmp-{host}.{boot}.{pid}.{int(start) + 1}-part-x"  # this pid, another start time: a previous process
    (tmp_path / dead / "_temporary" / "0").mkdir(parents=True)
    (tmp_path / dead / "_temporary" / "0" / "f.parquet").write_bytes(b"half")
    before_boot = f".tmp-{host}.{'0' * len(boot)}.{pid}.{start}-y.png"  # this host before a reboot
    other_host = f".tmp-{'0' * len(host)}.{boot}.1.1-x.png"  # another machine's: not ours to judge
    mine = f".tmp-{owner_tag()}-y.png"  # this process: alive
    parent = f".tmp-{host}.{boot}.{os.getppid()}.{_start_time(os.getppid())}-z"  # another live process
    legacy = ".tmp-model-0123abcd"  # no owner recorded: left alone
    for name in (before_boot, other_host, mine, legacy):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / parent).mkdir()
    (tmp_path / "part-done").mkdir()
    (tmp_path / "part-done" / dead).mkdir()  # below the folder: only with recursive=True
    removed = remove_orphans(str(tmp_path))
    assert removed == sorted([str(tmp_path / dead), str(tmp_path / before_boot)])
    assert sorted(os.listdir(tmp_path)) == sorted([other_host, mine, parent, legacy, "part-done"])
    assert remove_orphans(str(tmp_path), recursive=True) == [str(tmp_path / "part-done" / dead)]


def test_a_staged_folder_removes_the_staging_folders_of_killed_runs_beside_it(tmp_path):
    host, boot, pid, start = owner_tag().split(".")
    killed = tmp_path / f".tmp-{host}.{boot}.{pid}.{int(start) + 1}-exp-0123abcd"  # a previous process's
    (killed / "model").mkdir(parents=True)
    running = StagedFolder(str(tmp_path / "other"))
    os.mkdir(os.path.join(running.path, "model"))
    staged = StagedFolder(str(tmp_path / "exp"))
    assert not killed.exists() and os.path.isdir(running.path)  # a live owner's staging stays
    staged.discard()
    running.discard()


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


@pytest.mark.slow
def test_a_killed_writer_leaves_an_orphan_that_a_later_run_removes(tmp_path):
    """A writer in another process: its temporary folder survives cleanup while it runs, and is
    removed once it was killed."""
    script = ("import sys, time\nfrom xray.atomic import atomic_folder\n"
              "with atomic_folder(sys.argv[1]) as tmp:\n"
              "    import os; os.makedirs(os.path.join(tmp, '_temporary'))\n"
              "    print(tmp, flush=True); time.sleep(600)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([CODE, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "part-1")], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        tmp = proc.stdout.readline().strip()
        assert os.path.isdir(tmp)
        assert remove_orphans(str(tmp_path)) == [] and os.path.isdir(tmp)  # its writer is running
    finally:
        proc.kill()
        proc.wait()
    assert remove_orphans(str(tmp_path)) == [tmp] and os.listdir(tmp_path) == []
