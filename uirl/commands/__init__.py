"""Subcommands of the ``uirl`` command line (see :mod:`uirl.cli`)."""
