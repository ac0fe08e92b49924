"""The version of mmdelta (recorded in every patch file and standalone checkpoint)."""

__version__ = "0.1.0"
