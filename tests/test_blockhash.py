"""zfsrep.blockhash: the native block hashing against the pure-Python reference."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from zfsrep import blockhash
from zfsrep.blockhash import DIGEST_SIZE, reference

BLOCK_SIZES = [1, 7, 4096, 65536]
ROOT = Path(__file__).resolve().parent.parent


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def lengths_for(block_size: int) -> list[int]:
    """Empty, 1 byte, one block, exact multiples and partial tails."""
    sizes = {0, 1, block_size - 1, block_size, block_size + 1, 3 * block_size, 5 * block_size - 3}
    return sorted(n for n in sizes if n >= 0)


def test_native_module_is_built() -> None:
    # The other tests would pass on the fallback; this one says it is missing.
    assert blockhash.NATIVE, "zfsrep._blockhash not built (python native/build_blockhash.py)"
    assert blockhash.kernel() != "reference"


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_hash_blocks_matches_reference_on_edge_lengths(block_size: int) -> None:
    for n in lengths_for(block_size):
        data = random_bytes(n, seed=n)
        got = blockhash.hash_blocks(data, block_size)
        assert got == reference.hash_blocks(data, block_size), n
        assert len(got) == blockhash.block_count(n, block_size) * DIGEST_SIZE


def test_hash_blocks_of_empty_buffer_is_empty() -> None:
    assert blockhash.hash_blocks(b"", 4096) == b""
    assert blockhash.block_count(0, 4096) == 0


def test_last_partial_block_is_hashed_as_a_shorter_block() -> None:
    data = random_bytes(4096 + 10)
    digests = blockhash.hash_blocks(data, 4096)
    assert digests[DIGEST_SIZE:] == xxhash.xxh3_128_digest(data[4096:])


@pytest.mark.parametrize("block_size", [4096, 65536, 1 << 20])
def test_hash_blocks_matches_reference_on_8_mib(block_size: int) -> None:
    data = random_bytes(8 << 20, seed=block_size) + b"tail"
    assert blockhash.hash_blocks(data, block_size) == reference.hash_blocks(data, block_size)


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_accepts_bytes_bytearray_and_memoryview(wrap: type) -> None:
    data = random_bytes(3 * 4096 + 5)
    buf = wrap(data)
    assert blockhash.hash_blocks(buf, 4096) == reference.hash_blocks(data, 4096)
    assert blockhash.digest(buf) == xxhash.xxh3_128_digest(data)
    assert blockhash.zero_blocks(buf, 4096) == []
    assert blockhash.diff_blocks(buf, wrap(blockhash.hash_blocks(data, 4096)), 4096) == []


def test_memoryview_slice_is_hashed_without_its_surroundings() -> None:
    data = bytearray(random_bytes(10_000))
    view = memoryview(data)[100:8292]
    assert blockhash.hash_blocks(view, 4096) == reference.hash_blocks(bytes(view), 4096)


def test_memoryview_of_wider_items_is_hashed_as_bytes() -> None:
    view = memoryview(bytearray(random_bytes(8192))).cast("I")
    assert blockhash.hash_blocks(view, 4096) == reference.hash_blocks(view, 4096)
    assert blockhash.digest(view) == xxhash.xxh3_128_digest(view.tobytes())


@pytest.mark.parametrize("n", [0, 1, 16, 17, 128, 129, 240, 241, 4096, 1 << 20])
def test_digest_equals_xxhash_xxh3_128_digest(n: int) -> None:
    data = random_bytes(n, seed=n)
    assert blockhash.digest(data) == xxhash.xxh3_128_digest(data)
    assert blockhash.reference.digest(data) == xxhash.xxh3_128_digest(data)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_diff_blocks_of_unchanged_buffer_is_empty(block_size: int) -> None:
    data = random_bytes(3 * block_size + 2)
    assert blockhash.diff_blocks(data, blockhash.hash_blocks(data, block_size), block_size) == []


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_diff_blocks_finds_changed_blocks(block_size: int) -> None:
    old = random_bytes(6 * block_size + 3)
    new = bytearray(old)
    for i in (0, 2, 6):  # first, middle and the partial tail block
        new[i * block_size] ^= 0xFF
    digests = reference.hash_blocks(old, block_size)
    assert blockhash.diff_blocks(new, digests, block_size) == [0, 2, 6]
    assert reference.diff_blocks(new, digests, block_size) == [0, 2, 6]


def test_diff_blocks_treats_blocks_beyond_digests_as_changed() -> None:
    data = random_bytes(5 * 4096)
    shorter = blockhash.hash_blocks(data[: 2 * 4096], 4096)
    assert blockhash.diff_blocks(data, shorter, 4096) == [2, 3, 4]
    assert blockhash.diff_blocks(data, b"", 4096) == [0, 1, 2, 3, 4]
    assert reference.diff_blocks(data, shorter, 4096) == [2, 3, 4]


def test_diff_blocks_ignores_digests_beyond_the_buffer() -> None:
    data = random_bytes(5 * 4096)
    longer = blockhash.hash_blocks(data, 4096) + bytes(3 * DIGEST_SIZE)
    assert blockhash.diff_blocks(data[: 3 * 4096], longer, 4096) == []
    assert blockhash.diff_blocks(b"", longer, 4096) == []
    assert reference.diff_blocks(data[: 3 * 4096], longer, 4096) == []


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_zero_blocks_finds_mixed_zero_and_nonzero_blocks(block_size: int) -> None:
    nblocks = 9
    data = bytearray(nblocks * block_size + 1)  # last block is 1 byte
    data[1 * block_size] = 1  # first byte of block 1
    data[3 * block_size - 1] = 1  # last byte of block 2
    data[5 * block_size + block_size // 2] = 0x80  # middle of block 5
    data[6 * block_size : 7 * block_size] = random_bytes(block_size)
    expected = [0, 3, 4, 7, 8, 9]
    if block_size == 1:
        expected = [i for i in range(10) if not data[i]]
    assert blockhash.zero_blocks(data, block_size) == expected
    assert reference.zero_blocks(data, block_size) == expected


@pytest.mark.parametrize("tail", [0, 1, 15, 16, 17, 4095])
def test_zero_blocks_sees_a_set_last_byte_of_every_length(tail: int) -> None:
    data = bytearray(4096 + tail)
    assert blockhash.zero_blocks(data, 4096) == list(range(2 if tail else 1))
    data[-1] = 1
    assert blockhash.zero_blocks(data, 4096) == ([0] if tail else [])


def test_zero_blocks_of_large_buffer_matches_reference() -> None:
    data = bytearray(8 << 20)
    rng = random.Random(5)
    for _ in range(300):
        data[rng.randrange(len(data))] = rng.randrange(1, 256)
    assert blockhash.zero_blocks(data, 4096) == reference.zero_blocks(data, 4096)


@pytest.mark.parametrize("impl", [blockhash, reference], ids=["module", "reference"])
@pytest.mark.parametrize("block_size", [0, -1])
def test_nonpositive_block_size_is_rejected(impl: object, block_size: int) -> None:
    with pytest.raises(ValueError, match="block_size"):
        impl.hash_blocks(b"x", block_size)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="block_size"):
        impl.diff_blocks(b"x", b"", block_size)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="block_size"):
        impl.zero_blocks(b"x", block_size)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="block_size"):
        blockhash.block_count(10, block_size)


@pytest.mark.parametrize("size", [1, 15, 17, 33])
def test_digests_of_partial_length_are_rejected(size: int) -> None:
    for impl in (blockhash, reference):
        with pytest.raises(ValueError, match="multiple of 16"):
            impl.diff_blocks(b"x" * 100, bytes(size), 10)


def test_block_count() -> None:
    assert [blockhash.block_count(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="length"):
        blockhash.block_count(-1, 4)


KERNEL_CHECK_SIZES = (1, 7, 200, 241, 4096, 65536)


@pytest.mark.parametrize("cap", ["avx2", "default"])
def test_every_kernel_matches_reference(cap: str) -> None:
    # The kernel is chosen once at load time, so the capped ones run in a child.
    code = (
        "import random, sys\n"
        "from zfsrep import blockhash as b\n"
        "data = random.Random(9).randbytes(3 << 20)\n"
        "sys.stdout.write(b.kernel())\n"
        f"for bs in {KERNEL_CHECK_SIZES}:\n"
        "    sys.stdout.write(' ' + b.hash_blocks(data[: 40 * bs + 3], bs).hex())\n"
    )
    env = {**os.environ, "ZFSREP_XXH3_KERNEL": cap}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    kernel, *digests = out.split(" ")
    if not blockhash.kernel().startswith("shared"):  # a shared-library build ignores the cap
        assert kernel in (cap, "default")
    data = random.Random(9).randbytes(3 << 20)
    expected = [reference.hash_blocks(data[: 40 * bs + 3], bs).hex() for bs in KERNEL_CHECK_SIZES]
    assert digests == expected


def test_falls_back_to_reference_with_a_warning_when_not_built() -> None:
    code = (
        "import logging, sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'zfsrep._blockhash':\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "logging.basicConfig(format='%(levelname)s %(message)s')\n"
        "from zfsrep import blockhash as b\n"
        "data = bytes(5000) + b'x' * 5000\n"
        "print(b.NATIVE, b.kernel(), b.zero_blocks(data, 4096), b.diff_blocks(data, b'', 4096))\n"
        "print(b.hash_blocks(data, 4096).hex(), b.digest(data).hex())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True
    )
    data = bytes(5000) + b"x" * 5000
    assert proc.stdout.splitlines() == [
        "False reference [0] [0, 1, 2]",
        f"{blockhash.hash_blocks(data, 4096).hex()} {xxhash.xxh3_128_digest(data).hex()}",
    ]
    assert "WARNING zfsrep._blockhash is not built" in proc.stderr


# Runs of zeros and random bytes, so zero_blocks sees both kinds of block.
mixed_bytes = st.lists(
    st.one_of(st.binary(max_size=300), st.integers(0, 600).map(bytes)), max_size=20
).map(b"".join)


@settings(max_examples=200, deadline=None, database=None)
@given(data=mixed_bytes, block_size=st.integers(min_value=1, max_value=700))
def test_native_equals_reference_for_any_input(data: bytes, block_size: int) -> None:
    assert blockhash.hash_blocks(data, block_size) == reference.hash_blocks(data, block_size)
    assert blockhash.zero_blocks(data, block_size) == reference.zero_blocks(data, block_size)
    digests = reference.hash_blocks(data[: len(data) // 2], block_size)
    assert blockhash.diff_blocks(data, digests, block_size) == reference.diff_blocks(
        data, digests, block_size
    )


@pytest.mark.parametrize("sizes", [[], [0], [1, 0, 2], [240, 241, 4096], [1 << 20, 3, 65536]])
def test_digest_parts_equals_the_digest_of_the_joined_bytes(sizes: list[int]) -> None:
    parts = [os.urandom(n) for n in sizes]
    joined = b"".join(parts)
    assert blockhash.digest_parts(parts) == blockhash.digest(joined)
    assert blockhash.reference.digest_parts(parts) == blockhash.digest(joined)
    assert blockhash.digest_parts([memoryview(p) for p in parts]) == blockhash.digest(joined)


def _write_parts_case(impl, parts: list, hashed: set[int], offset: int, piece: int,
                      tmp_path: Path) -> tuple[bytes, bytes, list]:
    """(file bytes after ``offset``, returned digest, digest targets) of one write_parts."""
    targets = [bytearray(blockhash.block_count(len(parts[i]), 4096) * DIGEST_SIZE)
               if i in hashed else None for i in range(len(parts))]
    # a part right after a hashed one may be its digest buffer (filled before it is reached)
    parts = [targets[i - 1] if p is None else p for i, p in enumerate(parts)]
    path = tmp_path / f"out-{impl.__name__ if hasattr(impl, '__name__') else 'native'}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        got = impl(fd, offset, parts, targets, 4096, piece)
    finally:
        os.close(fd)
    return path.read_bytes()[offset:], got, targets


@pytest.mark.parametrize("sizes", [
    [0], [1], [4096], [4097], [256 << 10], [(1 << 20) + 123, 0, 5],
    [10] * 200,  # more parts than one pwritev takes at once
])
@pytest.mark.parametrize("piece", [4096, 256 << 10])
def test_write_parts_writes_hashes_and_checksums_like_the_separate_calls(
        sizes: list[int], piece: int, tmp_path: Path) -> None:
    rng = random.Random(len(sizes) * 7 + piece)
    datas = [rng.randbytes(n) for n in sizes]
    parts: list = []
    hashed: set[int] = set()
    for d in datas:
        if len(d) >= 4096:  # hashed, its digests follow it as the next part
            hashed.add(len(parts))
            parts += [d, None]
        else:
            parts.append(d)
    expected = b"".join(
        blockhash.hash_blocks(parts[i - 1], 4096) if p is None else p
        for i, p in enumerate(parts))
    for impl in (blockhash.write_parts, reference.write_parts):
        body, got, targets = _write_parts_case(impl, parts, hashed, 100, piece, tmp_path)
        assert body == expected
        assert got == blockhash.digest(expected)
        for i in hashed:
            assert targets[i] == blockhash.hash_blocks(parts[i], 4096)
    # staged into a buffer (the O_DIRECT spool) instead of written: the same bytes and sums
    for stage in (blockhash.stage_parts, reference.stage_parts):
        targets = [bytearray(blockhash.block_count(len(parts[i]), 4096) * DIGEST_SIZE)
                   if i in hashed else None for i in range(len(parts))]
        given = [targets[i - 1] if p is None else p for i, p in enumerate(parts)]
        dst = bytearray(len(expected) + 3)
        assert stage(memoryview(dst), given, targets, 4096, piece) == blockhash.digest(expected)
        assert bytes(dst[:len(expected)]) == expected
    if expected:
        with pytest.raises(ValueError, match="room"):
            blockhash.stage_parts(memoryview(bytearray(len(expected) - 1)),
                                  [targets[i - 1] if p is None else p
                                   for i, p in enumerate(parts)], targets, 4096, piece)


def test_write_parts_reports_a_failed_write_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(OSError) as e:
        blockhash.write_parts(-1, 0, [b"x" * 5000], [None], 4096)
    assert e.value.errno == 9  # EBADF
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError):
            blockhash.write_parts(fd, 0, [b"x"], [None], 4096)
        with pytest.raises(ValueError, match="multiple"):
            blockhash.write_parts(fd, 0, [b"x"], [None], 4096, piece=1000)
        with pytest.raises(ValueError, match="digest target"):
            blockhash.write_parts(fd, 0, [b"x" * 5000], [bytearray(16)], 4096)
        with pytest.raises(ValueError, match="targets"):
            blockhash.write_parts(fd, 0, [b"x"], [], 4096)
    finally:
        os.close(fd)
