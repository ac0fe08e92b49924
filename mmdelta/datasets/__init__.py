"""Datasets: checks that a config's data is where it says, and generated data for tests."""
