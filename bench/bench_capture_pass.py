#!/usr/bin/env python3
"""What the capture encoder's passes over a frame cost, whole frame or piece by piece.

The capture path hashed every 4 KiB block of a frame's data (``blockhash.hash_blocks``),
checksummed the frame (``blockhash.digest_parts``) and wrote it to the spool, each over the
whole 4 MiB frame in turn ("whole"): by the time the write reads the frame again, it has left
the core's L2 cache. This measures the same three steps over 1 GiB of frames that are not in
any cache, done frame by frame ("whole"), piece by piece from Python ("pieces", each piece
hashed, checksummed and written before the next is touched) and in one native call that does
the pieces itself ("native", ``blockhash.write_parts``: what the encoder does since), in CPU
seconds of this process per GiB, alone and while other processes write into the page cache
(as fio and the backing-file writes do beside the capture in a protected mount). Medians of
``--runs`` interleaved runs; the ratio is native/whole. Writes go to a scratch file under
``--workdir`` (deleted at the end).

    /tmp/venv/bin/python bench/bench_capture_pass.py            # ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from zfsrep import blockhash

MiB = 1 << 20
FRAME = 4 * MiB
BLOCK = 4096
#: frames are taken in turn from this much memory, more than any cache
POOL = 256 * MiB

_WRITER = """
import os, sys
buf = os.urandom(1 << 20)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
i = 0
while True:
    os.pwrite(fd, buf, (i % 1024) << 20)
    i += 1
"""


def whole(fd: int, buf: bytearray, off: int, piece: int) -> None:
    blockhash.hash_blocks(buf, BLOCK)
    blockhash.digest_parts([buf])
    os.pwrite(fd, buf, off)


def pieces(fd: int, buf: bytearray, off: int, piece: int) -> None:
    view = memoryview(buf)
    for at in range(0, len(buf), piece):
        part = view[at:at + piece]
        blockhash.hash_blocks(part, BLOCK)
        blockhash.digest_parts([part])  # (stands for a streaming checksum's update)
        os.pwrite(fd, part, off + at)


def native(fd: int, buf: bytearray, off: int, piece: int) -> None:
    """What the capture encoder does now: one call (blockhash.write_parts, native/'s
    zb_write_parts) that takes the frame piece by piece, with the GIL released."""
    digests = bytearray(blockhash.block_count(len(buf), BLOCK) * blockhash.DIGEST_SIZE)
    blockhash.write_parts(fd, off, [buf], [digests], BLOCK, piece)


def cpu_per_gib(fn, fd: int, frames: list[bytearray], piece: int) -> float:
    os.ftruncate(fd, 0)
    n = (1 << 30) // FRAME
    t0 = time.process_time()
    for i in range(n):
        fn(fd, frames[i % len(frames)], i * FRAME, piece)
    return time.process_time() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="interleaved runs per cell (default 5)")
    p.add_argument("--piece", type=int, default=256, help="piece size in KiB (default 256)")
    p.add_argument("--contend", type=int, default=2,
                   help="processes writing into the page cache meanwhile (default 2)")
    p.add_argument("--workdir", default="/var/tmp", help="where the scratch files go")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args()
    piece = args.piece << 10
    if piece <= 0 or FRAME % piece:
        p.error("--piece must divide 4096 (KiB)")
    frames = [bytearray(os.urandom(MiB)) * (FRAME // MiB) for _ in range(POOL // FRAME)]
    work = tempfile.mkdtemp(prefix="capture-pass-", dir=args.workdir)
    fd = os.open(os.path.join(work, "spool"), os.O_WRONLY | os.O_CREAT, 0o600)
    rows = []
    try:
        for label, nproc in (("alone", 0), (f"{args.contend} page-cache writers",
                                            args.contend)):
            writers = [subprocess.Popen([sys.executable, "-c", _WRITER,
                                         os.path.join(work, f"w{i}")],
                                        stdin=subprocess.DEVNULL) for i in range(nproc)]
            try:
                got: dict[str, list[float]] = {"whole": [], "pieces": [], "native": []}
                for run in range(args.runs):
                    for name, fn in (("whole", whole), ("pieces", pieces), ("native", native)):
                        got[name].append(cpu_per_gib(fn, fd, frames, piece))
                    print(f"[{label}] run {run + 1}/{args.runs}: whole "
                          f"{got['whole'][-1]:.3f}, pieces {got['pieces'][-1]:.3f}, native "
                          f"{got['native'][-1]:.3f} CPU-s/GiB", file=sys.stderr)
            finally:
                for w in writers:
                    w.kill()
                    w.wait()
            rows.append((label, *(statistics.median(got[k])
                                   for k in ("whole", "pieces", "native"))))
    finally:
        os.close(fd)
        for name in os.listdir(work):
            os.unlink(os.path.join(work, name))
        os.rmdir(work)
    if args.json:
        print(json.dumps({"piece_kib": args.piece, "runs": args.runs, "rows": [
            {"condition": label, "whole_cpu_s_per_gib": round(w_med, 4),
             "pieces_cpu_s_per_gib": round(p_med, 4), "native_cpu_s_per_gib": round(n_med, 4)}
            for label, w_med, p_med, n_med in rows]}))
        return 0
    print(f"hash + checksum + write of 1 GiB in 4 MiB frames ({args.piece} KiB pieces), "
          f"CPU-s of this process per GiB, median of {args.runs}; nproc={os.cpu_count()}")
    print(f"{'condition':<24} {'whole':>7} {'pieces':>7} {'native':>7}  {'native/whole':>12}"
          "  saved")
    for label, w_med, p_med, n_med in rows:
        print(f"{label:<24} {w_med:7.3f} {p_med:7.3f} {n_med:7.3f}  {n_med / w_med:11.2f}x  "
              f"{w_med - n_med:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
