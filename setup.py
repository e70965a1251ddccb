"""Build script. The package is pure Python today; the compiled extension (csrc/) joins it
with the native-backend issue, which is why this is a setup.py and not only pyproject.toml."""

from setuptools import setup

setup()
