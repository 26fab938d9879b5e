"""Stage 1, training: the embedded data and image folders, the architectures, the teacher
and the factorization (InfoMax-Bottleneck), their training loop, run folders and
evaluation. Needs the train extra (PyTorch); imports no later stage."""
