"""uirl's Flower ClientApp (one data silo)."""
