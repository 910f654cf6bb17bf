"""GPU benchmarks: `python -m bench.run` (the serve app end to end) and `python -m bench.forward`
(one transformer forward per attention backend / compile). See docs/gpu.md."""
