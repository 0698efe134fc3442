"""featcache: run frozen image+text backbones once into an HDF5 feature cache (see README: Architecture)."""
from . import extract  # noqa: F401  `featcache.extract(...)`: a callable package (light until called)
from .env import project_version

__version__ = project_version()  # the installed package's version (pyproject.toml), never a constant here
