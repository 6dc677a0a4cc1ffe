"""uirl's Flower ServerApp (the coordinator)."""
