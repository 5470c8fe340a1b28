"""zfsrep: continuous data protection for ordinary Linux directories."""

__version__ = "0.1.0"
