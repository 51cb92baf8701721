"""Atomic writes (`mara_hf.files`), shared by evaluation (results, responses, plots) and training (checkpoints,
metrics): a failed write leaves the old file and no temporary file; files follow the umask."""

import json
import os
import stat

import pytest

from mara_hf.files import write_atomic, write_json_atomic


def test_write_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    write_atomic(path, "old\n")
    write_json_atomic(path, {"gain": 26.0, "text": "⟦x→y⟧"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"gain": 26.0, "text": "⟦x→y⟧"}
    write_atomic(path, b"bytes\n")
    assert path.read_bytes() == b"bytes\n" and os.listdir(tmp_path) == ["results.json"]


def test_a_failed_write_leaves_the_old_content(tmp_path):
    path = tmp_path / "results.json"
    write_atomic(path, "old\n")
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json_atomic(path, {"gain": float("nan")})
    with pytest.raises(TypeError):
        write_atomic(path, 42)  # fails while writing the temporary file
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["results.json"]


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "shared.json", "{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o644
