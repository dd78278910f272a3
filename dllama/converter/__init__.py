"""Hugging Face checkpoint -> distributed-llama `.m` / `.t`.

    from dllama.converter.convert import convert            # convert(folder, "q40", out_dir, name=...)
    from dllama.converter.synthetic import write_checkpoint  # random HF checkpoints for tests/benchmarks
    from dllama.converter.hub import resolve_source          # local folder or hub repo id -> folder

Submodules are imported on demand: `encoders` (numba) loads only when something converts.
"""
