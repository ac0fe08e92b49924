"""MMEngine integration: the runner that applies ``delta_patch`` while building the model."""
