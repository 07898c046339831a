"""The policy: one model definition shared by the trainer, the generator and the kernels."""
