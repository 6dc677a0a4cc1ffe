"""uirl: federated, differentially private learning of user interest representations."""

__version__ = "0.1.0"
