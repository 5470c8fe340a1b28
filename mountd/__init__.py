"""The mount daemons (installed as ``zfsrep.mountd``): the FUSE layers and their wiring.

Only these modules import pyfuse3; they translate kernel requests into calls on the core.
``fusehook`` is imported first: it must be loaded before pyfuse3 (see its docstring).
"""

from zfsrep.mountd import fusehook as fusehook  # noqa: F401  (before any pyfuse3 import)
