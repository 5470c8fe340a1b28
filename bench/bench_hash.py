"""Throughput of zfsrep.blockhash against per-block Python loops and memcpy.

Usage: python bench/bench_hash.py [--json] [--runs N] [--size MIB]

Every sample of every method is timed in turn (interleaved), and the table
shows the median GB/s. The main buffer (64 MiB by default) does not fit in the
CPU caches, so those numbers are bounded by memory bandwidth, which the
memcpy row shows (bytes copied per second; each byte is read and written). A
second, cache-resident 1 MiB buffer shows the compute-bound speeds.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import xxhash

BLOCK_SIZES = (4096, 65536)
CACHED_SIZE = 1 << 20
TARGET_VS_LOOP = 2.0  # native batch / Python xxhash loop at 4 KiB
TARGET_VS_MEMCPY = 0.5  # native batch / memcpy at 64 KiB


def import_blockhash() -> ModuleType:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
    from zfsrep import blockhash

    return blockhash


def methods(bh: ModuleType, buf: bytearray, bs: int) -> dict[str, Callable[[], object]]:
    view = memoryview(buf)
    zeros = bytearray(len(buf))  # written below: calloc'd pages would all map the zero page
    ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(zeros)), 0, len(zeros))
    offsets = range(0, len(buf), bs)
    xxh3, blake2b = xxhash.xxh3_128_digest, hashlib.blake2b
    # ctypes views keep their bytearrays alive (and unresizable) while in use.
    src = (ctypes.c_char * len(buf)).from_buffer(buf)
    dst = (ctypes.c_char * len(buf)).from_buffer(bytearray(len(buf)))
    return {
        "native hash_blocks (batch)": lambda: bh.hash_blocks(buf, bs),
        "python loop xxh3_128_digest": lambda: b"".join([xxh3(view[o : o + bs]) for o in offsets]),
        "python loop blake2b-128": lambda: b"".join(
            [blake2b(view[o : o + bs], digest_size=16).digest() for o in offsets]
        ),
        "zero_blocks, all-zero buffer": lambda: bh.zero_blocks(zeros, bs),
        "zero_blocks, random (early exit)": lambda: bh.zero_blocks(buf, bs),
        "memcpy (ctypes.memmove)": lambda: ctypes.memmove(dst, src, len(buf)),
    }


def measure(bh: ModuleType, size: int, runs: int) -> dict[str, dict[int, float]]:
    """GB/s per method and block size: median of `runs` interleaved samples."""
    buf = bytearray(os.urandom(size))
    repeat = max(1, (64 << 20) // size)  # a sample processes at least 64 MiB
    results: dict[str, dict[int, float]] = {}
    for bs in BLOCK_SIZES:
        todo = methods(bh, buf, bs)
        samples: dict[str, list[float]] = {name: [] for name in todo}
        for fn in todo.values():  # warm up: page faults, lazy allocations
            fn()
        for _ in range(runs):
            for name, fn in todo.items():
                start = time.perf_counter()
                for _ in range(repeat):
                    fn()
                samples[name].append(time.perf_counter() - start)
        for name, times in samples.items():
            results.setdefault(name, {})[bs] = size * repeat / statistics.median(times) / 1e9
    return results


def print_table(title: str, results: dict[str, dict[int, float]]) -> None:
    print(f"\n{title}")
    print(f"  {'method':<32}" + "".join(f"{bs // 1024:>7} KiB" for bs in BLOCK_SIZES) + "  (GB/s)")
    for name, by_bs in results.items():
        print(f"  {name:<32}" + "".join(f"{by_bs[bs]:>11.2f}" for bs in BLOCK_SIZES))


def ratios(results: dict[str, dict[int, float]]) -> dict[str, float]:
    native = results["native hash_blocks (batch)"]
    return {
        "batch/xxhash-loop@4KiB": native[4096] / results["python loop xxh3_128_digest"][4096],
        "batch/memcpy@64KiB": native[65536] / results["memcpy (ctypes.memmove)"][65536],
    }


def verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "MISS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="also print results as JSON")
    parser.add_argument("--runs", type=int, default=7, help="samples per method (>= 5)")
    parser.add_argument("--size", type=int, default=64, help="main buffer size in MiB")
    args = parser.parse_args(argv)
    bh = import_blockhash()
    size = args.size << 20
    runs = max(args.runs, 5)

    main_res = measure(bh, size, runs)
    cached_res = measure(bh, CACHED_SIZE, runs)
    print(f"zfsrep.blockhash benchmark: kernel={bh.kernel()} native={bh.NATIVE}, median of {runs}")
    print_table(f"{args.size} MiB random buffer (out of cache, memory-bound)", main_res)
    print_table(f"{CACHED_SIZE >> 20} MiB random buffer (cache-resident, repeated)", cached_res)

    main_ratios, cached_ratios = ratios(main_res), ratios(cached_res)
    targets = {"batch/xxhash-loop@4KiB": TARGET_VS_LOOP, "batch/memcpy@64KiB": TARGET_VS_MEMCPY}
    print(f"\nratios on the {args.size} MiB buffer (cache-resident in brackets):")
    for key, target in targets.items():
        value, cached = main_ratios[key], cached_ratios[key]
        print(
            f"  {key:<24} {value:5.2f}  (target >= {target}) {verdict(value, target)}"
            f"   [{cached:5.2f} {verdict(cached, target)}]"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "kernel": bh.kernel(),
                    "native": bh.NATIVE,
                    "runs": runs,
                    "gbps": {f"{args.size}MiB": main_res, f"{CACHED_SIZE >> 20}MiB": cached_res},
                    "ratios": {
                        f"{args.size}MiB": main_ratios,
                        f"{CACHED_SIZE >> 20}MiB": cached_ratios,
                    },
                    "targets": targets,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
