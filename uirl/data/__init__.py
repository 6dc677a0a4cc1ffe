"""Data: table schema and validation, the synthetic default dataset, and the evaluation split.

Real datasets: :mod:`uirl.data.formats` reads them as published, :mod:`uirl.data.convert` writes a
converted directory with fixed evaluation lists (:mod:`uirl.data.fixed_split`; a benchmark's
own lists: :mod:`uirl.data.fixed_lists`), and
:mod:`uirl.data.partition` assigns users to silos; :mod:`uirl.data.silo` loads one silo.
"""

from uirl.data.schema import (BEHAVIORS, POSITIVE_BEHAVIORS, positive_mask, validate_events,
                              validate_items)
from uirl.data.split import (UserData, build_users, load_candidates, sample_training_example,
                             save_candidates, touched_items)
from uirl.data.synthetic import CLUSTERS, TOPICS, SyntheticData, SyntheticSpec, generate

__all__ = ["BEHAVIORS", "CLUSTERS", "POSITIVE_BEHAVIORS", "TOPICS", "SyntheticData", "SyntheticSpec",
           "UserData", "build_users", "generate", "load_candidates", "positive_mask",
           "sample_training_example", "save_candidates", "touched_items", "validate_events",
           "validate_items"]
