"""reid_kernels: fused kernels for pairwise distances and metric/center losses.

Each op lives in one file with its Triton kernel, autograd Function, torch reference and
dispatcher (architecture decision 6).
"""
