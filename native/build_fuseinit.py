"""cffi build script for ``zfsrep._fuseinit`` (API mode, out-of-line): the INIT-reply hook
that negotiates FUSE_HANDLE_KILLPRIV_V2 for pyfuse3 sessions (see native/fuseinit.c).

Built against the system libfuse3 (Debian: libfuse3-dev) found with pkg-config.
``python native/build_fuseinit.py`` builds it in place for working without pip.
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
ffi.cdef("int zf_install(void);\nint zf_killpriv_v2(void);")
ffi.set_source(
    "zfsrep._fuseinit",
    '#include "fuseinit.h"',
    sources=["native/fuseinit.c"],
    depends=["native/fuseinit.h"],
    include_dirs=["native"] + [t[2:] for t in _cflags if t.startswith("-I")],
    library_dirs=[t[2:] for t in _libs if t.startswith("-L")],
    libraries=[t[2:] for t in _libs if t.startswith("-l")] + ["dl"],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    so = ffi.compile(tmpdir=str(root), verbose=False)
    for obj in (root / "native" / "fuseinit.o", root / "zfsrep" / "_fuseinit.o"):
        obj.unlink(missing_ok=True)
    print(so)
