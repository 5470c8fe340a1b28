"""The only importer of ``zfsrep._fuseinit`` (native/fuseinit.c): adds
FUSE_HANDLE_KILLPRIV_V2 to the INIT reply of a pyfuse3 session, so the kernel stops asking for
``security.capability`` before every write (see the C file for the measurement and the why).

The compiled module must be loaded with RTLD_GLOBAL before pyfuse3 is imported, so that
pyfuse3's call of ``fuse_session_new`` binds to the module's wrapper; ``zfsrep.mountd``
imports this module first for that reason. Everything degrades to plain pyfuse3 behaviour
when the module is missing or the kernel does not offer the flag.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

if "pyfuse3" in sys.modules:  # pragma: no cover - import order mistake
    log.warning("pyfuse3 was imported before zfsrep.mountd: writes will be slower")

_flags = sys.getdlopenflags()
try:
    sys.setdlopenflags(_flags | os.RTLD_GLOBAL)
    from zfsrep import _fuseinit  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - only when the extension was not built
    _fuseinit = None
finally:
    sys.setdlopenflags(_flags)


def install() -> bool:
    """Hook the session that ``pyfuse3.init`` just created; False if that is not possible."""
    if _fuseinit is None:
        log.info("zfsrep._fuseinit is not available: FUSE_HANDLE_KILLPRIV_V2 not negotiated")
        return False
    rc = _fuseinit.lib.zf_install()
    if rc != 0:
        log.info("cannot hook the FUSE session (%d): FUSE_HANDLE_KILLPRIV_V2 not negotiated", rc)
    return rc == 0


def killpriv_v2() -> bool:
    """Whether the kernel accepted FUSE_HANDLE_KILLPRIV_V2 (known after the INIT exchange)."""
    return _fuseinit is not None and bool(_fuseinit.lib.zf_killpriv_v2())
