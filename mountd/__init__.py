"""The mount daemons (installed as ``zfsrep.mountd``): the FUSE layers and their wiring.

Only these modules import pyfuse3; they translate kernel requests into calls on the core.
"""
