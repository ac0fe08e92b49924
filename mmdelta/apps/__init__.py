"""Applications built on the mmdelta library: the main-job demo (``apps.demo``), the
benchmark against the alternatives (``apps.benchmark``) and the logic behind the measuring
tools (quickcheck, label-free gap, cost benches).

An application may import anything from the library; nothing outside ``mmdelta/apps/``
imports an application (``tests/test_layers.py`` enforces it). This module imports nothing.
"""
