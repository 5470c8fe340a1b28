"""The errno table, the exit codes, and how the CLI reports user errors."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from zfsrep import cli, frames
from zfsrep.errors import (
    CorruptDataError,
    ExitCode,
    FrameError,
    NotFoundError,
    OSFailure,
    ScriptError,
    StateError,
    UnsafePathError,
    UsageError,
    ZfsrepError,
    errno_of,
)
from zfsrep.records import Op
from zfsrep.spool import SpoolWriter, VolumeIdentity

ROOT = 777


@pytest.mark.parametrize("exc,expected", [
    (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
    (PermissionError(errno.EPERM, "no"), errno.EPERM),
    (FileNotFoundError(errno.ENOENT, "gone"), errno.ENOENT),
    (OSError("no errno"), errno.EIO),
    (NotFoundError("x"), errno.ENOENT),
    (UnsafePathError("x"), errno.EACCES),
    (StateError("x"), errno.EROFS),
    (CorruptDataError("x"), errno.EIO),
    (FrameError("x"), errno.EIO),
    (ZfsrepError("x"), errno.EIO),
    (Exception("x"), errno.EIO),
    (ValueError("x"), errno.EIO),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v))
def test_errno_of_maps_each_exception(exc: BaseException, expected: int):
    assert errno_of(exc) == expected


def test_exit_codes_are_distinct():
    codes = {name: value for name, value in vars(ExitCode).items() if name.isupper()}
    assert len(set(codes.values())) == len(codes)
    assert codes["OK"] == 0


def test_each_error_class_carries_its_own_nonzero_exit_code():
    classes = [UsageError, NotFoundError, StateError, CorruptDataError, UnsafePathError,
               OSFailure, ScriptError]
    codes = [c("m").exit_code for c in classes]
    assert len(set(codes)) == len(codes) and 0 not in codes
    assert ZfsrepError("m").exit_code == ExitCode.FAILURE
    assert ZfsrepError("m", exit_code=ExitCode.CORRUPT).exit_code == ExitCode.CORRUPT
    assert FrameError("m").exit_code == ExitCode.CORRUPT


def _spool(path: Path, records: list[list]) -> Path:
    w = SpoolWriter(path, VolumeIdentity(source="/src", root_ident=ROOT, block_size=4096))
    if records:
        w.write_frame(frames.encode_frame(records), records[0][0], records[-1][0])
    w.close()
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("zfsrep: ")
    return lines[0]


def test_no_command_is_a_usage_error(capsys):
    assert cli.main([]) == ExitCode.USAGE == 2
    out = capsys.readouterr()
    assert "usage" in out.out.lower()
    assert "Traceback" not in out.err


def test_replay_of_a_missing_spool_is_not_found(tmp_path: Path, capsys):
    code = cli.main(["replay", str(tmp_path / "nospool"), str(tmp_path / "dest")])
    assert code == ExitCode.NOT_FOUND == 3
    assert "nospool" in _one_error_line(capsys)
    assert not (tmp_path / "dest").exists()


def test_replay_into_a_non_empty_destination_is_a_usage_error(tmp_path: Path, capsys):
    spool = _spool(tmp_path / "spool", [])
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    assert cli.main(["replay", str(spool), str(dest)]) == ExitCode.USAGE == 2
    assert "not an empty directory" in _one_error_line(capsys)
    assert [p.name for p in dest.iterdir()] == ["keep"]


def test_spool_show_of_a_garbage_volume_json_is_corrupt(tmp_path: Path, capsys):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "volume.json").write_text("{this is not json")
    assert cli.main(["spool", "show", str(spool)]) == ExitCode.CORRUPT == 5
    assert "volume.json" in _one_error_line(capsys)


def test_replay_of_a_hostile_name_is_unsafe(tmp_path: Path, capsys):
    rec = [1, 0, Op.NEW, ROOT, b"..", 5, 0o100644, 0, 0, 0, None, 0, 0]
    spool = _spool(tmp_path / "spool", [rec])
    assert cli.main(["replay", str(spool), str(tmp_path / "dest")]) == ExitCode.UNSAFE == 7
    _one_error_line(capsys)


def test_replay_and_show_of_a_good_spool_succeed(tmp_path: Path, capsys):
    recs = [[1, 0, Op.NEW, ROOT, b"f", 5, 0o100640, 0, 0, 0, None, 10**18, 10**18],
            [2, 0, Op.WRITE, 5, 0, b"content", None, 10**18]]
    spool = _spool(tmp_path / "spool", recs)
    dest = tmp_path / "dest"
    assert cli.main(["replay", "--json", str(spool), str(dest)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == 2
    assert (dest / "f").read_bytes() == b"content"
    assert cli.main(["spool", "show", "--json", str(spool)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["records"], shown["root_ident"], shown["last_seq"]) == (2, ROOT, 2)


def test_names_in_messages_are_quoted_text_not_bytes_literals() -> None:
    from zfsrep.errors import shown

    assert shown(b"a b") == "'a b'"
    assert shown(b"bad\x01\n") == "'bad\\x01\\n'"  # control characters escaped: one line
    assert shown(b"\xff") == "'\\udcff'"  # undecodable bytes visible, not dropped
    assert shown(7) == "7"
