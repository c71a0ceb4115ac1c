"""Datasets in the DAPO-Math schema."""
