"""Deprecated alias of :mod:`pixreg.train.process_group` (kept for one version: the name was
too close to the core's :mod:`pixreg.distributed`)."""
import warnings

from .process_group import *  # noqa: F401,F403
from .process_group import __all__  # noqa: F401

warnings.warn("pixreg.train.dist is deprecated; use pixreg.train.process_group", DeprecationWarning, stacklevel=2)
