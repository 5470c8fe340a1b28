"""The record vocabulary of a volume's change stream (documented in docs/record-format.md).

A record is a list ``[seq, time_ns, op, *args]``. ``seq`` numbers the records of one volume
from 1 without gaps, in the order the filesystem completed the operations; ``time_ns`` is the
wall-clock time of completion. File identities (``id``) are the backing inode numbers: stable
across renames and restarts, shared by hard links, and unique among live files.

The argument lists below are the contract between capture (``zfsrep.volume``, ``zfsrep.scan``)
and every consumer (``zfsrep.replay``, later the journal). Timestamps carried in records are the
values the backing filesystem holds after the operation, so a rebuilt tree matches exactly.
"""

from __future__ import annotations

import enum


class Op(enum.IntEnum):
    #: [parent, name, id, mode, uid, gid, rdev, symlink_target|None, mtime_ns, parent_mtime_ns]
    NEW = 1
    #: [id, new_parent, new_name, parent_mtime_ns]
    LINK = 2
    #: [parent, name, id, parent_mtime_ns]   (unlink or rmdir; id says which object)
    REMOVE = 3
    #: [old_parent, old_name, new_parent, new_name, flags, id, other_id|None,
    #:  old_parent_mtime_ns, new_parent_mtime_ns]
    #: other_id is the replaced object (plain rename) or the exchanged one (RENAME_EXCHANGE).
    RENAME = 4
    #: [id, offset, data, digests, mtime_ns]  digests: 16-byte XXH3-128 per BLOCK_SIZE block
    #: of data; the request path records None and the capture encoder fills it in.
    WRITE = 5
    #: [id, size, mtime_ns]
    TRUNCATE = 6
    #: [id, mode, uid, gid, mtime_ns]  the object's attributes after a chmod/chown/utimens
    SETATTR = 7
    #: [id, name, value]
    SETXATTR = 8
    #: [id, name]
    REMOVEXATTR = 9
    #: [id, mode, offset, length, mtime_ns]  fallocate(2) as applied (FALLOC_FL_* mode bits:
    #: allocation, KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE, COLLAPSE_RANGE, INSERT_RANGE)
    FALLOCATE = 10


#: Block size of the per-block digests carried by WRITE records (see docs/record-format.md).
BLOCK_SIZE = 4096

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

#: Index of the first argument in a record (after seq, time_ns, op).
ARGS = 3
