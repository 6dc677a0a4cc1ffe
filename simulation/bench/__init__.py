"""``python -m simulation.bench``: where a run's time, memory and bytes go (see :mod:`simulation.bench.__main__`)."""
