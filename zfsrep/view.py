"""A volume's tree as it was at one checkpoint, read from the store's index without replaying
the journal (docs/store-index.md).

This module is the interface every reader of a checkpoint uses: the snapshot mount
(``zfsrep.mountd.snapshot``), file-level restore (``zfsrep.restore``) and later the test and
recovery copies. Identities are the captured ones (backing inode numbers, docs/record-format.md);
``root`` is the volume root's identity.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Protocol


class Node(NamedTuple):
    """One object's attributes at the view's checkpoint."""

    ident: int
    mode: int  # including the S_IF* type bits
    uid: int
    gid: int
    size: int
    mtime_ns: int
    nlink: int
    rdev: int = 0


class SnapshotView(Protocol):
    """Read-only tree of one volume at one stream position (every record with seq <= ``seq``)."""

    root: int
    seq: int

    def getattr(self, ident: int) -> Node:
        """Attributes of ``ident``; NotFoundError if it does not exist at this checkpoint."""
        ...

    def lookup(self, parent: int, name: bytes) -> Node | None:
        """The object named ``name`` in directory ``parent``, or None."""
        ...

    def readdir(self, parent: int, after: bytes = b"", limit: int = 1 << 30
                ) -> list[tuple[bytes, Node]]:
        """Entries of ``parent`` sorted by name, those with name > ``after``, at most ``limit``."""
        ...

    def readlink(self, ident: int) -> bytes:
        ...

    def read(self, ident: int, offset: int, size: int) -> bytes:
        """File content; short at end of file; holes read as zeros."""
        ...

    def listxattr(self, ident: int) -> list[bytes]:
        ...

    def getxattr(self, ident: int, name: bytes) -> bytes | None:
        ...

    def close(self) -> None:
        ...


def open_view(volume_dir: Path, seq: int) -> SnapshotView:
    """Open the tree of the volume stored in ``volume_dir`` as of record ``seq`` (read-only;
    safe while the journal server goes on indexing newer records)."""
    from zfsrep.indexview import IndexView  # (not zfsrep.index: the indexer is not needed)

    return IndexView(volume_dir, seq)
