"""LlamaGen class-conditional GPT on ImageNet 256 from VQ-16 codes (reference/llamagen_star.md §1.2–1.5).

`configs/llamagen_imagenet256.py:model=xl` picks GPT-B / L / XL / XXL / 3B (12/768/12, 24/1024/16,
36/1280/20, 48/1536/24, 24/3200/32: 110.9M / 342.9M / 774.7M / 1.41B / 3.10B parameters here
over 16×16 codes from 16,384; the paper: 111M / 343M / 775M / 1.4B / 3.1B). Recipe
(`train_c2i.py`): batch 256, constant lr 1e-4·B/256 without warmup, AdamW(0.9, 0.95) weight decay
0.05 on ≥ 2-D tensors, clip 1.0, label drop 0.1, dropout 0.1, 300 epochs, bf16; the codes are
LlamaGen's ten crops (a training item reads one). Sampling: CFG in logit space at the paper's FID
scale per size (B, L 2.0; XL, XXL 1.75; 3B 1.65), top-k 0, top-p 1, temperature 1.
Chain: train `configs/vq16_imagenet256.py` (or convert LlamaGen's vq_ds16_c2i.pt into such a run),
`--mode cache` it (ten crops) into `cache`, then train here with `vq=<tokenizer run>`.
`st_ar=True`: ST-AR (`methods/st_ar.py`) at the paper's settings: two distinct crops of the ten
per image, mask ratio 0.25, contrastive features from the middle block (the paper prints 18 for
L: `--config.st_ar.contrastive_layer=18`), teacher EMA 0.9999; it trains 50 or 300 epochs.
"""
import ml_collections

from ardiff_jax import configlib
from ardiff_jax.methods.llamagen import llamagen_base_config
from ardiff_jax.presets import IMAGENET_TRAIN_IMAGES, use_imagenet_images, use_st_ar

CFG = {"b": 2.0, "l": 2.0, "xl": 1.75, "xxl": 1.75, "3b": 1.65}


def get_config(arg=None):
  a = configlib.parse_arg(arg, model="b", batch=256, epochs=300, vq="workdirs/vq16",
                          cache="workdirs/vq16/cache", st_ar=False)
  if a.model not in CFG:
    raise ValueError(f"model={a.model!r}: choose one of {sorted(CFG)}")
  c = llamagen_base_config(f"gpt_{a.model}", a.batch)
  c.llamagen.tokenizer_workdir = a.vq
  c.data.path = a.cache
  c.data.image_size = 256
  c.data.num_classes = 1000
  c.data.eval_split = "validation"
  c.data.random_flip = True        # draw one of the ten crops per item
  c.data.num_workers = 8
  c.train.num_steps = a.epochs * IMAGENET_TRAIN_IMAGES // a.batch
  c.train.compute_dtype = "bfloat16"
  c.train.log_every = 100
  c.train.ckpt_every = 5000
  c.sample.cfg_scale = CFG[a.model]
  c.sample.batch_size = 256
  c.eval.num_samples = 50000
  c.eval.batch_size = 256
  c.eval.data = ml_collections.ConfigDict(configlib.base_config().data.to_dict())
  use_imagenet_images(c.eval.data)   # the reference images of the metrics
  c.bench.steps = 10
  if a.st_ar:
    use_st_ar(c, short_run=False)
  return c
