"""Compiled kernels: cpu.py (numba), gpu.py (triton). Loaded on first use by _backend."""
