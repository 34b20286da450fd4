"""MAR's checkpoint-last.pth -> a MAR run (`--mode convert`): the state-dict names and shapes,
written out here from MAR's constructors (models/mar.py, timm's Block, models/diffloss.py),
convert; the run holds "model" as its weights and "model_ema" as its EMA."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from ardiff_jax import main as main_lib
from ardiff_jax.convert import common
from ardiff_jax.convert import mar as convert_mar
from ardiff_jax.methods import mar as mar_method
from ardiff_jax.train import checkpoint
from tests.evals import torch_files
from tests.helpers import load_config


def _config():
  config = load_config("mar_digits", "tiny")
  config.tokenizer.latent_scale = 1.0
  return config


def _official_shapes(m) -> dict[str, tuple[int, ...]]:
  """MAR(...).state_dict() names and shapes for the sizes of our model `m`."""
  d, tok, hidden = m.width, m.token_dim, int(m.width * m.mlp_ratio)
  slots, w = m.seq_len + m.buffer_size, m.head_width
  out = {"class_emb.weight": (m.num_classes, d), "fake_latent": (1, d),
         "z_proj.weight": (d, tok), "z_proj.bias": (d,), "z_proj_ln.weight": (d,),
         "z_proj_ln.bias": (d,), "encoder_pos_embed_learned": (1, slots, d),
         "encoder_norm.weight": (d,), "encoder_norm.bias": (d,),
         "decoder_embed.weight": (d, d), "decoder_embed.bias": (d,), "mask_token": (1, 1, d),
         "decoder_pos_embed_learned": (1, slots, d), "decoder_norm.weight": (d,),
         "decoder_norm.bias": (d,), "diffusion_pos_embed_learned": (1, m.seq_len, d)}
  for stack, depth in (("encoder_blocks", m.enc_depth), ("decoder_blocks", m.dec_depth)):
    for i in range(depth):
      for name, shape in (("norm1", (d,)), ("norm2", (d,))):
        out[f"{stack}.{i}.{name}.weight"] = out[f"{stack}.{i}.{name}.bias"] = shape
      for name, o, n in (("attn.qkv", 3 * d, d), ("attn.proj", d, d), ("mlp.fc1", hidden, d),
                         ("mlp.fc2", d, hidden)):
        out[f"{stack}.{i}.{name}.weight"], out[f"{stack}.{i}.{name}.bias"] = (o, n), (o,)
  net = "diffloss.net"
  for name, o, n in (("time_embed.mlp.0", w, 256), ("time_embed.mlp.2", w, w),
                     ("cond_embed", w, d), ("input_proj", w, tok),
                     ("final_layer.adaLN_modulation.1", 2 * w, w),
                     ("final_layer.linear", 2 * tok, w)):
    out[f"{net}.{name}.weight"], out[f"{net}.{name}.bias"] = (o, n), (o,)
  for i in range(m.head_depth):
    out[f"{net}.res_blocks.{i}.in_ln.weight"] = out[f"{net}.res_blocks.{i}.in_ln.bias"] = (w,)
    for name, o in (("mlp.0", w), ("mlp.2", w), ("adaLN_modulation.1", 3 * w)):
      out[f"{net}.res_blocks.{i}.{name}.weight"], out[f"{net}.res_blocks.{i}.{name}.bias"] = (o, w), (o,)
  return out


_official = lambda params: common.export_state_dict(params, convert_mar.torch_name)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  config = _config()
  model = mar_method.build_model(config)
  init = lambda seed: nn.meta.unbox(mar_method.make_method(config).init_params(jax.random.key(seed)))
  params, ema = init(1), init(2)
  path = str(tmp_path_factory.mktemp("mar") / "checkpoint-last.pth")
  torch_files.save_zip(path, _official(params), key="model",
                       others={"model_ema": _official(ema)})
  return config, model, params, ema, path


def test_the_map_covers_mars_names_and_shapes_exactly(official):
  _, model, params, _, _ = official
  got = {k: v.shape for k, v in _official(params).items()}
  assert got == _official_shapes(model)


def test_a_converted_checkpoint_is_a_run_with_its_weights_and_its_ema(official, tmp_path):
  config, _, params, ema, path = official
  config.convert.source = path
  workdir = str(tmp_path / "run")
  main_lib.run(config, workdir, "convert")
  jax.tree.map(np.testing.assert_array_equal, checkpoint.restore_run_params(workdir, use_ema=False),
               params)
  jax.tree.map(np.testing.assert_array_equal, checkpoint.restore_run_params(workdir, use_ema=True),
               ema)
