"""Run the Flower app as processes: ``uirl run`` (a local simulation) and ``uirl deploy`` (a
SuperLink and one SuperNode per silo on this machine, with TLS and SuperNode authentication).

These modules start Flower's executables (``flwr``, ``flower-superlink``, ``flower-supernode``) as
subprocesses and read what the ServerApp wrote to the run directory; they never import Flower.
"""
