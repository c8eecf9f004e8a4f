"""Triton kernels, one file per algorithm; shared ``@triton.jit`` helpers in ``_common``."""
