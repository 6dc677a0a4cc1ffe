"""Readers of datasets in the layout their publishers ship: each returns the schema's tables."""
