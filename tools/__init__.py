"""The maintainers' measurement tools: one benchmark configuration built and timed (bench_measure.py, driven by
bench.py at the root), the FLOPs of a training step and the matmul peak (bench_flops.py), and the TPU memory model
(tpu_memory.py, `python -m tools.tpu_memory`)."""
