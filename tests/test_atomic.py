"""Atomic writers: a new version replaces the old whole; a failure mid-write leaves the old
version and no temporary file or folder."""

from __future__ import annotations

import json
import os
import stat

import pytest

from xray.atomic import StagedFolder, atomic_file, atomic_folder, write_json_atomic, write_text_atomic


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
