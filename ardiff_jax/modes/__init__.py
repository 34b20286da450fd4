"""The CLI modes, one module each, every one with `run(config, workdir)`.

A mode restores a run or starts one (through the engine, `train/`), calls the engine, a sampler
(through its `Method`) or the evaluator (`evals/`), and writes the workdir files. `main.py` only
picks the module; notebooks and tests call `ardiff_jax.modes.<mode>.run` directly.
"""

MODES = ("train", "sample", "eval", "cache", "bench", "aot", "probe", "convert")
