"""The method registry: what the method-agnostic engine needs from each training objective.

A method is one module `methods/<module>.py` with a `make_method(config) -> Method` factory, and
one line in `METHODS` below (name -> module). Its networks live in `models/` or `tokenizers/`, its
samplers in `sampling/`, its configs in `configs/`. The engine (`train/`) and every mode
(`modes/`) only ever talk to a `Method`; a method never imports the engine, a mode or `evals/`
(the layer contract in pyproject.toml).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import jax
import ml_collections

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Method:
  """One training objective bound to its model and config.

  Attributes:
    name: registry key.
    model: the flax module (or tuple of modules) the objective trains.
    init_params: rng -> params tree, leaves boxed with logical axis names.
    loss_fn: (params, batch, rng, step, extras) -> (loss, metrics dict, new extras). Pure, jit-able;
      `extras` is the method-owned part of the train state (empty dict if none).
    batch_keys: the keys of a data batch the loss reads, e.g. ("image", "label").
    decay_mask: params -> bool tree, True where AdamW weight decay applies.
    init_extras: rng -> dict of method-owned state (EMA teacher, queues...), saved with checkpoints.
    visualize: (params, batch, rng) -> dict with `images` uint8 [N,H,W,C], `labels` int [N],
      `grid_columns` int and optional scalar metrics: what `--mode sample` writes.
    encode: (params, images [B,H,W,C] in [-1,1]) -> moments/codes: what `--mode cache` stores
      (tokenizers only).
    codebook_size: K for a VQ tokenizer, whose `encode` returns int codes [B,h,w] in [0, K); 0
      for continuous tokenizers (and every other method).
    generate: (params, frozen, batch, rng) -> uint8 images [B,H,W,3]: what `--mode eval` and, for
      generators, `--mode sample` produce. `frozen` is what `load_frozen` returned (None if absent).
      With generate_from="labels" the batch holds class-balanced `label` int32 [B]; with
      "images" (tokenizers) it holds held-out `image` [B,H,W,3] in [-1,1] and `label`, and the
      method returns their reconstructions.
    load_frozen: (restore_run_params) -> weights the method uses but does not train (a tokenizer's
      decoder), loaded once by the sample and eval modes. The engine passes in its
      `restore_run_params(workdir, use_ema=None)`, so a method names the run it needs without
      importing the engine.
    init_frozen: rng -> freshly initialised weights of the same structure (for `--mode bench`,
      which measures speed without needing a trained tokenizer).
    sampling_params: (params, extras) -> what `generate` receives as `params`: the weights plus any
      method-owned state sampling reads (condition refinement's reference queue). Identity by default.
    condition_probe: a `methods.condref.ConditionProbe` for the condition-error analysis
      (DiffLoss generators), else None.
    loss_reads_ema: when True the engine calls loss_fn(..., ema_params=<the EMA weights>) (read
      only, e.g. as a teacher).
    loss_reads_frozen: when True the engine calls loss_fn(..., frozen=<what load_frozen returns>)
      (read only, no gradient, replicated; e.g. a pretrained text encoder or an AR teacher);
      `--mode bench` and `--mode aot` pass `init_frozen`'s weights of the same shapes.
    check_batch: (a host batch of the training data, NumPy) -> None, raising ValueError with the
      fix when the data does not fit the method (e.g. codes of another tokenizer); the engine
      calls it on a first batch before anything is written.
    auxiliary_params: params -> bool tree, True for parameters trained beside the model as an
      instrument (condition refinement's E_φ); the optimizer clips their gradient by its own
      global norm, so they never rescale the model's update. None: one norm over all.
    probe_features: (params, codes int32 [B, L], layer int) -> features float32 [B, L, D]: the
      hidden state after transformer block `layer` (1-based; 0 = the method's default, half the
      depth) of the frozen model, teacher-forced with the null class token (what `--mode probe`
      trains linear heads on). None for methods without a discrete-token trunk.
    generate_tokens: (params, frozen, batch, rng) -> the generator's tokens (codes or vectors)
      before the tokenizer's decoder: what `--mode bench` times apart from decoding
      (`sample_tokens_img_per_s`). None: only `generate` is timed.
    warm_start: (fresh params as host arrays, restore_run_params) -> the params a new run starts
      from (e.g. a teacher's weights with a new input layer fitted to its table), or a pair
      (params, extras) whose extras (host arrays) replace those keys of the initial method state
      (DD2's guidance network, from a run other than the params'); called once, when a run has
      no checkpoint yet. None: the fresh initialisation.
    extras_from_params: params -> dict of method-owned state that starts from the initial weights
      (an EMA teacher equal to the student at step 0), merged into `init_extras`' dict. Its
      leaves are sharded like the parameters whose key path ends theirs.
  """
  name: str
  model: Any
  init_params: Callable[[jax.Array], PyTree]
  loss_fn: Callable[..., tuple[jax.Array, dict, dict]]
  batch_keys: tuple[str, ...]
  decay_mask: Callable[[PyTree], PyTree] | None = None
  init_extras: Callable[[jax.Array], dict] = lambda rng: {}
  visualize: Callable[..., dict] | None = None
  encode: Callable[..., jax.Array] | None = None
  codebook_size: int = 0
  generate: Callable[..., jax.Array] | None = None
  generate_from: str = "labels"
  load_frozen: Callable[[], PyTree] | None = None
  init_frozen: Callable[[jax.Array], PyTree] | None = None
  sampling_params: Callable[[PyTree, dict], PyTree] = lambda params, extras: params
  condition_probe: Any = None
  loss_reads_ema: bool = False
  loss_reads_frozen: bool = False
  check_batch: Callable[[dict], None] | None = None
  auxiliary_params: Callable[[PyTree], PyTree] | None = None
  probe_features: Callable[..., jax.Array] | None = None
  extras_from_params: Callable[[PyTree], dict] | None = None
  warm_start: Callable[..., PyTree] | None = None
  generate_tokens: Callable[..., jax.Array] | None = None


def restore_checked_run(restore_run_params, workdir: str, field: str, kind: str,
                        has: tuple[str, ...] = (), lacks: tuple[str, ...] = ()):
  """The parameters of the run at `workdir` (named by the config `field`), refused with a message
  naming `kind` when the field is empty or the run's top-level parameters lack one of `has` or
  hold one of `lacks` (another kind of run)."""
  if not workdir:
    raise ValueError(f"{field} is empty: point it at {kind}")
  params = restore_run_params(workdir)
  if any(k not in params for k in has) or any(k in params for k in lacks):
    raise ValueError(f"{field}={workdir!r} is not {kind}: its parameters hold {sorted(params)}")
  return params


def frozen_run_loader(workdir: str, part: str, field: str, kind: str):
  """A `Method.load_frozen` that reads `params[part]` of the run at `workdir` (e.g. a tokenizer's
  autoencoder), with errors naming the config `field` and the `kind` of run expected."""

  def load(restore_run_params):
    if not workdir:
      raise ValueError(f"{field} is empty: point it at the {kind} run whose decoder turns tokens "
                       "into images")
    params = restore_run_params(workdir)
    if part not in params:
      raise ValueError(f"{field}={workdir!r} is not a {kind} run: its parameters hold "
                       f"{sorted(params)}, not {part!r}")
    return params[part]

  return load


# Method name (config.method) -> its module in this package. Modules are imported on first use,
# so a config pays only for the method it names.
METHODS: dict[str, str] = {
    "kl_tokenizer": "kl_tokenizer",
    "vq_tokenizer": "vq_tokenizer",
    "feature_classifier": "feature_classifier",
    "mar": "mar",
    "ar_diffusion": "ar_diffusion",
    "llamagen": "llamagen",
    "st_ar": "st_ar",
    "paella": "paella",
    "dd2_adapt": "dd2_adapt",
    "dd2_tune": "dd2_tune",
    "dd2": "dd2",
}


def get_method(config: ml_collections.ConfigDict) -> Method:
  if config.method not in METHODS:
    raise ValueError(f"config.method={config.method!r} is not a known method; "
                     f"choose one of {sorted(METHODS)}")
  module = importlib.import_module(f"{__name__}.{METHODS[config.method]}")
  return module.make_method(config)
