"""The journal server's store directory: VPG settings and the per-volume layout
(docs/store-layout.md). Plain files, no sockets; the server owns the only writer.

Layout::

    STORE/store.json                          format marker
    STORE/vpgs/<vpg>/vpg.json                 settings (VpgSettings)
    STORE/vpgs/<vpg>/checkpoints.log          checkpoint log (zfsrep.checkpoints)
    STORE/vpgs/<vpg>/operation.json           the recovery operation under way, if any
    STORE/recovery/<vpg>/                     default recovery directory (test/, live/)
    STORE/vpgs/<vpg>/volumes/<vol>/volume.json    identity and sync state (VolumeMeta)
    STORE/vpgs/<vpg>/volumes/<vol>/journal/       durable journal (zfsrep.journal)
    STORE/vpgs/<vpg>/volumes/<vol>/index.sqlite, packs/   the index (zfsrep.index)
    STORE/vpgs/<vpg>/removed/<vol>.<cp>/      a volume removed from the VPG after checkpoint
                                              <cp> (the last that holds it): its journal and
                                              index, and removed.json (RemovedVolume)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

from zfsrep.errors import CorruptDataError, NotFoundError, StateError, UsageError

FORMAT = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

MAX_HISTORY_S = 30 * 86400


def check_name(kind: str, name: str) -> str:
    """VPG and volume names: 1-64 of letters, digits, '.', '_', '-', not starting with a
    punctuation mark (they become directory names)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsageError(f"bad {kind} name {name!r}: use 1-64 letters, digits, '.', '_' or "
                         "'-', starting with a letter or digit")
    return name


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _write_json(path: Path, data: dict) -> None:
    """Write atomically and durably: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFoundError(f"{what}: {path} does not exist") from None
    except ValueError as e:
        raise CorruptDataError(f"{what}: {path} is unreadable ({e})") from None
    if not isinstance(data, dict):
        raise CorruptDataError(f"{what}: {path} is not a JSON object")
    return data


@dataclass
class VpgSettings:
    name: str
    history_s: float = 8 * 3600
    rpo_s: float = 10.0
    checkpoint_interval_s: float = 5.0
    created: str = field(default_factory=_now_iso)
    #: where recovered data appears (test/VOLUME, live/VOLUME); "" for STORE/recovery/VPG
    recovery_dir: str = ""

    def check(self) -> None:
        check_name("VPG", self.name)
        if self.recovery_dir and not os.path.isabs(self.recovery_dir):
            raise UsageError(f"recovery directory must be an absolute path, not "
                             f"{self.recovery_dir!r}")
        if not 0 < self.history_s <= MAX_HISTORY_S:
            raise UsageError("history must be more than 0 and at most 30 days")
        if not 0 < self.rpo_s <= 86400:
            raise UsageError("RPO target must be more than 0 and at most a day")
        if not 0.2 <= self.checkpoint_interval_s <= 3600:
            raise UsageError("checkpoint interval must be between 0.2 s and 1 h")

    @classmethod
    def from_dict(cls, data: dict) -> VpgSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class VolumeMeta:
    """What the server knows of a volume between connections."""

    name: str
    root_ident: int
    source: str
    host: str
    spool_id: str
    #: seq of the last record of the initial sync (0 while it has not completed)
    synced_seq: int = 0
    created: str = field(default_factory=_now_iso)

    @classmethod
    def from_dict(cls, data: dict) -> VolumeMeta:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class RemovedVolume:
    """A volume taken out of its VPG (``zfsrep vpg remove-volume``): checkpoints up to
    ``last_checkpoint`` still name it, and find its data in ``dir``."""

    name: str
    last_checkpoint: int
    root_ident: int
    removed: str
    dir: Path


class Store:
    """The store directory of one journal server."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        marker = root / "store.json"
        if marker.exists():
            data = _read_json(marker, "store")
            if data.get("format") != FORMAT:
                raise CorruptDataError(f"{root}: unsupported store format {data.get('format')}")
        else:
            if any(p.name not in ("lost+found", "server.log") for p in root.iterdir()):
                raise StateError(f"{root} is not empty and not a zfsrep store")
            _write_json(marker, {"format": FORMAT, "created": _now_iso()})
        (root / "vpgs").mkdir(exist_ok=True)

    # ---- VPGs ----------------------------------------------------------------------------
    def vpg_dir(self, name: str) -> Path:
        return self.root / "vpgs" / check_name("VPG", name)

    def vpg_names(self) -> list[str]:
        return sorted(p.name for p in (self.root / "vpgs").iterdir()
                      if (p / "vpg.json").exists())

    def create_vpg(self, settings: VpgSettings) -> None:
        settings.check()
        path = self.vpg_dir(settings.name)
        if (path / "vpg.json").exists():
            raise StateError(f"VPG {settings.name} already exists")
        (path / "volumes").mkdir(parents=True, exist_ok=True)
        _write_json(path / "vpg.json", asdict(settings))

    def load_vpg(self, name: str) -> VpgSettings:
        path = self.vpg_dir(name) / "vpg.json"
        if not path.exists():
            raise NotFoundError(f"no VPG named {name}")
        return VpgSettings.from_dict(_read_json(path, f"VPG {name}"))

    def save_vpg(self, settings: VpgSettings) -> None:
        settings.check()
        _write_json(self.vpg_dir(settings.name) / "vpg.json", asdict(settings))

    def delete_vpg(self, name: str) -> None:
        """Remove a VPG and everything it holds (the settings file goes first, so a crash
        half-way leaves a directory the server ignores and the next delete finishes)."""
        path = self.vpg_dir(name)
        if not path.exists():
            raise NotFoundError(f"no VPG named {name}")
        doomed = path.with_name(f".deleting-{name}-{os.getpid()}")
        os.rename(path, doomed)
        shutil.rmtree(doomed)

    def recovery_dir(self, settings: VpgSettings) -> Path:
        return Path(settings.recovery_dir) if settings.recovery_dir else \
            self.root / "recovery" / settings.name

    def load_operation(self, vpg: str) -> dict | None:
        path = self.vpg_dir(vpg) / "operation.json"
        return _read_json(path, f"operation of VPG {vpg}") if path.exists() else None

    def save_operation(self, vpg: str, operation: dict | None) -> None:
        """Persist the recovery operation under way (None: there is none)."""
        path = self.vpg_dir(vpg) / "operation.json"
        if operation is not None:
            _write_json(path, operation)
        elif path.exists():
            path.unlink()
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def checkpoint_log_path(self, vpg: str) -> Path:
        return self.vpg_dir(vpg) / "checkpoints.log"

    # ---- volumes -------------------------------------------------------------------------
    def volume_dir(self, vpg: str, volume: str) -> Path:
        return self.vpg_dir(vpg) / "volumes" / check_name("volume", volume)

    def volume_names(self, vpg: str) -> list[str]:
        vols = self.vpg_dir(vpg) / "volumes"
        if not vols.is_dir():
            return []
        return sorted(p.name for p in vols.iterdir()
                      if not p.name.startswith(".") and (p / "volume.json").exists()
                      and not (p / "removed.json").exists())

    def load_volume(self, vpg: str, volume: str) -> VolumeMeta | None:
        path = self.volume_dir(vpg, volume) / "volume.json"
        if not path.exists():
            return None
        return VolumeMeta.from_dict(_read_json(path, f"volume {vpg}/{volume}"))

    def save_volume(self, vpg: str, meta: VolumeMeta) -> None:
        path = self.volume_dir(vpg, meta.name)
        path.mkdir(parents=True, exist_ok=True)
        _write_json(path / "volume.json", asdict(meta))

    def remove_volume(self, vpg: str, volume: str, last_checkpoint: int,
                      root_ident: int) -> RemovedVolume:
        """Move a (closed) volume's directory aside, where the checkpoints up to
        ``last_checkpoint`` find it; its name is free again. The marker is written into the
        directory before it moves, so a crash leaves it either active or removed."""
        src = self.volume_dir(vpg, volume)
        dest_parent = self.vpg_dir(vpg) / "removed"
        dest_parent.mkdir(exist_ok=True)
        dest = dest_parent / f"{volume}.{last_checkpoint}"
        if dest.exists():
            raise StateError(f"{dest} exists already")
        removed = _now_iso()
        _write_json(src / "removed.json", {"name": volume, "last_checkpoint": last_checkpoint,
                                            "root_ident": root_ident, "removed": removed})
        os.rename(src, dest)
        for d in (src.parent, dest_parent):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return RemovedVolume(volume, last_checkpoint, root_ident, removed, dest)

    def discard_volume(self, vpg: str, volume: str) -> None:
        """Delete a (closed) volume that no checkpoint holds (renamed away first, so a crash
        half-way leaves nothing the server loads)."""
        src = self.volume_dir(vpg, volume)
        doomed = src.with_name(f".deleting-{volume}-{os.getpid()}")
        os.rename(src, doomed)
        shutil.rmtree(doomed)

    def removed_volumes(self, vpg: str) -> list[RemovedVolume]:
        """The volumes removed from the VPG, oldest first."""
        vols = self.vpg_dir(vpg) / "volumes"
        if vols.is_dir():  # a removal a crash interrupted between the marker and the move
            for d in vols.iterdir():
                if (d / "removed.json").exists():
                    data = _read_json(d / "removed.json", f"removed volume {d.name}")
                    dest = self.vpg_dir(vpg) / "removed" / f"{d.name}.{data['last_checkpoint']}"
                    dest.parent.mkdir(exist_ok=True)
                    os.rename(d, dest)
        parent = self.vpg_dir(vpg) / "removed"
        if not parent.is_dir():
            return []
        out = []
        for d in parent.iterdir():
            if (d / "removed.json").exists():
                data = _read_json(d / "removed.json", f"removed volume {d.name}")
                out.append(RemovedVolume(data["name"], int(data["last_checkpoint"]),
                                         int(data["root_ident"]), data["removed"], d))
        return sorted(out, key=lambda r: r.last_checkpoint)

    def bytes_used(self, vpg: str) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.vpg_dir(vpg)):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
        return total
