"""cffi build script for ``zfsrep._fusehook`` (API mode, out-of-line): the session hook of the
protected mount (FUSE_HANDLE_KILLPRIV_V2 and the READ/WRITE fast path; see native/fusehook.c).

Built against the system libfuse3 (Debian: libfuse3-dev) found with pkg-config.
``python native/build_fusehook.py`` builds it in place for working without pip.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from cffi import FFI


def _pkg_config(*args: str) -> list[str]:
    exe = shutil.which("pkg-config")
    if exe is not None:
        try:
            out = subprocess.run([exe, *args, "fuse3"], check=True, capture_output=True,
                                 text=True).stdout
            return shlex.split(out)
        except (OSError, subprocess.CalledProcessError):
            pass
    return ["-I/usr/include/fuse3"] if "--cflags" in args else ["-lfuse3"]


_cflags = _pkg_config("--cflags")
_libs = _pkg_config("--libs")

ffi = FFI()
# The declarations are those of native/fusehook.h, without its preprocessor lines.
_HEADER = Path(__file__).with_name("fusehook.h").read_text()
ffi.cdef("\n".join(ln for ln in _HEADER.splitlines() if not ln.lstrip().startswith("#")))
ffi.set_source(
    "zfsrep._fusehook",
    '#include "fusehook.h"',
    sources=["native/fusehook.c"],
    depends=["native/fusehook.h"],
    include_dirs=["native"] + [t[2:] for t in _cflags if t.startswith("-I")],
    library_dirs=[t[2:] for t in _libs if t.startswith("-L")],
    libraries=[t[2:] for t in _libs if t.startswith("-l")] + ["dl", "pthread"],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    so = ffi.compile(tmpdir=str(root), verbose=False)
    for obj in (root / "native" / "fusehook.o", root / "zfsrep" / "_fusehook.o"):
        obj.unlink(missing_ok=True)
    print(so)
