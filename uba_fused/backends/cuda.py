"""backend="cuda": the optimizer kernels of csrc/ (issue #4: not written yet)."""

raise NotImplementedError("the CUDA optimizer kernels are not written yet; use backend='torch' or 'auto'")
