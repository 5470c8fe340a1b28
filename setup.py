# pyproject.toml cannot declare cffi modules yet; this file only does that.
from setuptools import setup

setup(cffi_modules=["native/build_blockhash.py:ffi", "native/build_fusehook.py:ffi"])
