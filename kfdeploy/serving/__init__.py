"""Stage 4, serving: Triton model repositories, `kfdeploy serve` and the model it runs
inside Triton, and the routed composition that answers mixed-task batches. Stage 3, the
runtime, is kfdeploy/runtime.py; the front ends (cli, demo) sit beside it."""
