"""Triton kernels, one folder per op, each beside a plain-PyTorch `naive.py` reference."""
