"""One package per op: registration, autograd and dispatch in __init__, plus reference.py and
triton.py beside it; the C++ and CUDA kernels live in csrc/."""
