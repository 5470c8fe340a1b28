"""cffi build script for ``zfsrep._blockhash`` (API mode, out-of-line).

setup.py names this file in ``cffi_modules``; setuptools imports it with the
repository root as the current directory, so all paths below are relative to
that root. ``python native/build_blockhash.py`` builds the extension in place
(``zfsrep/_blockhash.*.so``) for working without pip.

The C code uses the system libxxhash (Debian: libxxhash-dev). By default it is
compiled header-only (XXH_INLINE_ALL) with run-time AVX2/AVX-512 selection; set
``ZFSREP_XXHASH=shared`` to link libxxhash.so instead (see native/blockhash.c
for why inline is the default).

GIL: in API mode cffi wraps every call of a cdef'd function in
Py_BEGIN_ALLOW_THREADS / Py_END_ALLOW_THREADS (checked in the generated
zfsrep/_blockhash.c), so hashing in a worker thread does not hold up the event
loop or other threads. The C functions only read their input buffers and write
their output buffers, so this is safe as long as callers do not resize a
bytearray while a call on it runs (ffi.from_buffer keeps it alive, not fixed).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from cffi import FFI

# The declarations are those of native/blockhash.h, without its preprocessor lines.
CDEF = "\n".join(ln for ln in (Path(__file__).with_name("blockhash.h").read_text()
                               .splitlines()) if not ln.lstrip().startswith("#"))


def _pkg_config(*args: str) -> list[str] | None:
    """Tokens printed by ``pkg-config ARGS libxxhash``, or None if that fails."""
    exe = shutil.which("pkg-config")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, *args, "libxxhash"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return shlex.split(out)


def _flags(shared: bool) -> dict[str, list[str]]:
    include_dirs = ["native"]
    library_dirs: list[str] = []
    libraries: list[str] = []
    define_macros: list[tuple[str, str | None]] = []
    cflags = _pkg_config("--cflags")
    if cflags is not None:
        include_dirs += [t[2:] for t in cflags if t.startswith("-I")]
    if shared:
        define_macros.append(("ZB_SHARED_LIBXXHASH", None))
        libs = _pkg_config("--libs")
        if libs is None:  # no pkg-config or no .pc file: the Debian default location
            libs = ["-lxxhash"]
        library_dirs += [t[2:] for t in libs if t.startswith("-L")]
        libraries += [t[2:] for t in libs if t.startswith("-l")]
    # -O3 is what xxHash recommends for GCC; no -march, the result must run on
    # any CPU of the architecture (the C code selects SIMD kernels at load time).
    extra = [] if sys.platform == "win32" else ["-O3", "-Wall"]
    return {
        "include_dirs": include_dirs,
        "library_dirs": library_dirs,
        "libraries": libraries,
        "define_macros": define_macros,  # type: ignore[dict-item]
        "extra_compile_args": extra,
    }


ffi = FFI()
ffi.cdef(CDEF)
ffi.set_source(
    "zfsrep._blockhash",
    '#include "blockhash.h"',
    sources=["native/blockhash.c"],
    depends=["native/blockhash.h"],
    **_flags(shared=os.environ.get("ZFSREP_XXHASH", "inline") == "shared"),
)


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    # cffi compiles with tmpdir as the working directory, so the relative paths
    # above resolve against the root and the module lands in zfsrep/.
    so = ffi.compile(tmpdir=str(root), verbose=True)
    for obj in (root / "native" / "blockhash.o", root / "zfsrep" / "_blockhash.o"):
        obj.unlink(missing_ok=True)
    print(so)
