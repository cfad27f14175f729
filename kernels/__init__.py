"""quantkit.kernels: Triton kernels beside their torch references (arrives with the kernels issue)."""
