"""Triton kernels. Submodules import triton; this package itself imports nothing, so that
``import fastattn`` never needs triton. Under ``TRITON_INTERPRET=1`` (set before a kernel
module is imported) the kernels run on CPU tensors, which is how CI tests them."""
