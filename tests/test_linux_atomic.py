"""Atomic replacement: whole old or whole new content, the mode asked for, no litter."""

from __future__ import annotations

import os

import pytest

from guestagent.linux.atomic import remove, write_atomically


@pytest.mark.parametrize("durable, mode", [(True, 0o600), (False, 0o644)])
def test_replaces_whole_with_the_mode_asked_for(tmp_path, durable, mode):
    path = str(tmp_path / "f")
    write_atomically(path, b"old", mode=0o666, durable=durable)
    inode = os.stat(path).st_ino
    write_atomically(path, b"new" * 100_000, mode=mode, durable=durable)
    st = os.stat(path)
    assert (st.st_mode & 0o777, st.st_ino != inode) == (mode, True)
    assert open(path, "rb").read() == b"new" * 100_000
    assert os.listdir(tmp_path) == ["f"]
    remove(path, durable)
    remove(path, durable)  # already gone: fine
    assert os.listdir(tmp_path) == []


def test_a_failed_replace_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "d"
    target.mkdir()  # rename(2) of a file onto a directory fails
    with pytest.raises(IsADirectoryError):
        write_atomically(str(target), b"x")
    assert os.listdir(tmp_path) == ["d"] and target.is_dir()
