"""Compiled kernels: cpu.py (numba), gpu.py (triton), loaded on first use by _backend;
cpp.py builds and loads csrc/eager.cpp, the C++ eager path over cpu.py's kernels."""
