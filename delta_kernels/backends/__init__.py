"""Native backends: thin wrappers that allocate outputs and pass pointers to csrc/ kernels."""
