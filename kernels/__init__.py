"""Triton kernels of pyobjectives, importable as ``pyobjectives.kernels``.

Importing this package never imports Triton: each kernel module does, and the
backend registry imports them only after checking that Triton is usable.
"""
