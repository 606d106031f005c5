"""Resonant's code generator: schema/*.yaml -> Cython codec, Python classes, specs, tests."""
