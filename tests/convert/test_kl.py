"""MAR's KL-16 file -> a KL tokenizer run (`--mode convert`): the names and shapes of LDM's
AutoencoderKL state dict, written out here from LDM's module structure, convert and load; the
converted run holds exactly the weights the file was made from; a renamed or mis-shaped tensor
and an existing run are refused."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from ardiff_jax import main as main_lib
from ardiff_jax.convert import common
from ardiff_jax.convert import kl as convert_kl
from ardiff_jax.methods import latent_tokens as lt
from ardiff_jax.train import checkpoint
from tests.evals import torch_files
from tests.helpers import load_config


def _config():
  config = load_config("kl_digits", "tiny")
  config.tokenizer.overrides.enc_attn_resolutions = (8,)       # attention blocks on both sides
  config.tokenizer.overrides.dec_attn_resolutions = (8,)
  return config


def _ldm_shapes(ae) -> dict[str, tuple[int, ...]]:
  """LDM's AutoencoderKL state-dict names and torch shapes (conv OIHW) for `ae`'s sizes, following
  its Encoder / Decoder constructors (ldm/modules/diffusionmodules/model.py)."""
  out = {}
  conv = lambda name, cin, cout, k: out.update({f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)})
  norm = lambda name, c: out.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})

  def resnet(name, cin, cout):
    norm(f"{name}.norm1", cin); conv(f"{name}.conv1", cin, cout, 3)
    norm(f"{name}.norm2", cout); conv(f"{name}.conv2", cout, cout, 3)
    if cin != cout:
      conv(f"{name}.nin_shortcut", cin, cout, 1)

  def attn(name, c):
    norm(f"{name}.norm", c)
    for part in ("q", "k", "v", "proj_out"):
      conv(f"{name}.{part}", c, c, 1)

  def mid(prefix, c):
    resnet(f"{prefix}.mid.block_1", c, c); attn(f"{prefix}.mid.attn_1", c); resnet(f"{prefix}.mid.block_2", c, c)

  ch, mult, res = ae.enc_ch, tuple(ae.enc_ch_mult), ae.resolution
  conv("encoder.conv_in", 3, ch, 3)
  block_in = ch
  for i, m in enumerate(mult):
    block_in = ch * ((1,) + mult)[i]
    for j in range(ae.enc_num_res_blocks):
      resnet(f"encoder.down.{i}.block.{j}", block_in, ch * m)
      block_in = ch * m
      if res in ae.enc_attn_resolutions:
        attn(f"encoder.down.{i}.attn.{j}", block_in)
    if i != len(mult) - 1:
      conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
      res //= 2
  mid("encoder", block_in)
  norm("encoder.norm_out", block_in)
  conv("encoder.conv_out", block_in, 2 * ae.z_channels, 3)
  conv("quant_conv", 2 * ae.z_channels, 2 * ae.embed_dim, 1)
  conv("post_quant_conv", ae.embed_dim, ae.z_channels, 1)
  ch, mult = ae.dec_ch, tuple(ae.dec_ch_mult)
  block_in, res = ch * mult[-1], ae.resolution // 2 ** (len(mult) - 1)
  conv("decoder.conv_in", ae.z_channels, block_in, 3)
  mid("decoder", block_in)
  for i in reversed(range(len(mult))):
    for j in range(ae.dec_num_res_blocks + 1):
      resnet(f"decoder.up.{i}.block.{j}", block_in, ch * mult[i])
      block_in = ch * mult[i]
      if res in ae.dec_attn_resolutions:
        attn(f"decoder.up.{i}.attn.{j}", block_in)
    if i != 0:
      conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
      res *= 2
  norm("decoder.norm_out", block_in)
  conv("decoder.conv_out", block_in, 3, 3)
  return out


_official = lambda params: common.export_state_dict(params, convert_kl.torch_name)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  """(config, the weights the file is made from, the file's path, its state dict)."""
  config = _config()
  ae = lt.build_autoencoder(config)
  params = nn.meta.unbox(ae.init(jax.random.key(3), np.zeros((1, 16, 16, 3), np.float32),
                                 jax.random.key(4))["params"])
  state_dict = _official(params)
  path = str(tmp_path_factory.mktemp("kl") / "kl16.ckpt")
  extra = {"loss.discriminator.main.0.weight": np.ones((4, 3, 4, 4), np.float32)}   # training-only
  torch_files.save_zip(path, {**state_dict, **extra}, key="model")
  return config, params, path, state_dict


def test_the_map_covers_ldms_names_and_shapes_exactly(official):
  config, _, _, state_dict = official
  want = _ldm_shapes(lt.build_autoencoder(config))
  assert {k: v.shape for k, v in state_dict.items()} == want


def test_a_converted_file_is_a_run_holding_its_weights(official, tmp_path):
  config, params, path, _ = official
  config.convert.source = path
  workdir = str(tmp_path / "run")
  summary = main_lib.run(config, workdir, "convert")
  assert summary["converted"] == ["ae"]
  got = checkpoint.restore_run_params(workdir)
  jax.tree.map(np.testing.assert_array_equal, got["ae"], params)
  assert "logvar" in got                       # the parts the file lacks: fresh
  main_lib.run(config, workdir, "sample")                     # a converted run samples as any run
  with pytest.raises(ValueError, match="already holds a run"):
    main_lib.run(config, workdir, "convert")


@pytest.mark.parametrize("damage", ["rename", "reshape"])
def test_a_renamed_or_misshaped_tensor_is_refused_by_name(official, tmp_path, damage):
  config, _, _, state_dict = official
  bad = dict(state_dict)
  name = "decoder.up.1.block.0.conv1.weight"
  if damage == "rename":
    bad["decoder.up.1.block.0.conv_1.weight"] = bad.pop(name)
  else:
    bad[name] = bad[name][:, :-1]
  path = str(tmp_path / "bad.ckpt")
  torch_files.save_zip(path, bad, key="model")
  config.convert.source = path
  with pytest.raises(ValueError, match=name.replace(".", r"\.")) as err:
    main_lib.run(config, str(tmp_path / "run"), "convert")
  if damage == "rename":
    assert "unexpected" in str(err.value) and "conv_1" in str(err.value)


def test_no_source_or_no_converter_is_refused_before_anything_is_written(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match="convert.source is empty"):
    main_lib.run(_config(), str(workdir), "convert")
  with pytest.raises(ValueError, match="no converter for method 'llamagen'"):
    main_lib.run(load_config("llamagen_digits", "tiny"), str(workdir), "convert")
  assert not workdir.exists()
