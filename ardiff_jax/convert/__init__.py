"""Official checkpoints (PyTorch files) -> ardiff_jax parameters, without PyTorch installed."""

# Method name -> the module of `convert/` whose `params_from_file(source, key, abstract_params)`
# gives the parts of the run's parameters a released file holds (`--mode convert`), and whose
# optional `ema_params_from_file` gives its EMA weights when the file has them apart.
CONVERTERS: dict[str, str] = {
    "kl_tokenizer": "kl",
    "mar": "mar",
}
