"""Simulated environments: data generation and closed-loop evaluation, each in a package of its own."""
