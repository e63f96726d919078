"""Benchmarks: `speed` (the speed harness), `soak` (long play without resets), `vector_throughput`; `memory` reads process memory."""
