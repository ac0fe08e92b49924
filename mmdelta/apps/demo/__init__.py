"""The main job on embedded data: data, base, patches, evaluation, report."""
