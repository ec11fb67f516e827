"""Triton kernels, one file per op family. Each file holds @triton.jit kernels and the launchers
(`<op>_fwd`, `<op>_bwd`) that allocate outputs and choose the grid; no autograd here.

Set TRITON_INTERPRET=1 before importing fastnorm to run these kernels on CPU tensors.
"""
