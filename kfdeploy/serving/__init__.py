"""Stage 4, serving: Triton model repositories, `kfdeploy serve` and the model it runs
inside Triton, and the routed composition that answers mixed-task batches. Stage 3, the
runtime, is kfdeploy/runtime.py; the front ends (cli, demo) sit beside it."""

# Defaults the CLI shows, here so that building its parser imports no serving module.
# `kfdeploy serve`'s queue delay, measured here (2 cores, batch-1 requests, benchmarks/serve.py):
# at 16 concurrent clients a delay of 250-2000 us served 0.95-1.2x what none did over two
# runs, while every lone request waits it out (p50 at 1 client 1.17 ms with none, 1.41 ms
# at 250 us, 2.21 ms at 1000 us). Latency first: no delay.
SERVE_QUEUE_DELAY_US = 0
SERVE_DRAIN_TIMEOUT_S = 30
# Repositories for someone else's Triton (`kfdeploy triton-repo`), where clients across a
# network make lone requests rarer: a short wait for a batch.
REPOSITORY_QUEUE_DELAY_US = 1000
