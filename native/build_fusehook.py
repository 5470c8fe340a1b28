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
ffi.cdef("""
#define ZF_WRITE 0
#define ZF_SETATTR 1
typedef struct {
    uint32_t kind;
    uint32_t mode;
    uint32_t uid;
    uint32_t gid;
    uint64_t ident;
    uint64_t offset;
    uint64_t mtime_ns;
    uint8_t *data;
    size_t len;
} zf_rec;

typedef struct {
    uint64_t reads;
    uint64_t writes;
    uint64_t fsyncs;
    uint64_t setattrs;
} zf_counters;
int zf_install(int eventfd, int fast, size_t limit);
int zf_killpriv_v2(void);
int zf_register(uint64_t fh, uint64_t ident, uint32_t uid, int capture);
void zf_unregister(uint64_t fh);
size_t zf_pending(void);
size_t zf_take(zf_rec *out, size_t max);
void zf_set_held(size_t bytes);
void zf_free(void *p);
zf_counters zf_counts(void);
void zf_shutdown(void);
""")
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
