"""Experiment configs: each file has get_config(variant) returning an ml_collections.ConfigDict."""
