"""Benchmarks that print their figures: turns, quantization, memory, and the memory estimator."""
