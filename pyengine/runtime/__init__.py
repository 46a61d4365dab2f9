"""Running a model: KV cache, the recorded C++ decode plan, sampling, the scheduler."""
