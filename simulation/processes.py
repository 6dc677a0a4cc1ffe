"""Alias of :mod:`uirl.launch.processes` (process handling moved to the product side)."""

from uirl.launch.processes import *  # noqa: F401,F403
from uirl.launch.processes import ROOT, stop_tree  # noqa: F401
