"""Paella v2 at the paper's scale: the 1B token predictor at 256 px on COCO captions, conditioned on
ByT5-XL and CLIP-H from local checkpoints (reference/dd2_paella.md §3).

Inputs (nothing is downloaded):
- `vq`: a Paella VQGAN run at 256 px (`configs/paella_vq_*.py` with `preset=paella_f4`), whose
  encoder makes the codes of every batch (f = 4: 64×64 codes from 8,192) and whose decoder draws;
- `byt5`: a Hugging Face google/byt5-xl folder (its encoder's 2560-wide last_hidden_state);
- `clip`: a Hugging Face CLIPModel folder of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (text and image
  embeddings, 1024 wide, 4 condition tokens each; its vocab.json and merges.txt tokenize);
- `path`: a COCO 2017 folder (annotations/captions_{train,val}2017.json, {train,val}2017/).
The paper's recipe: paella_1b (1,008,350,592 predictor parameters), uniform renoising, the
η-weighted label-smoothed loss, AdamW lr 1e-4 (0.9/0.999, weight decay 0.01) after 10k warmup
steps, clip 1.0, batch 2,048, 1.5M steps, bf16 compute; condition dropout ByT5 0.05, CLIP text
0.9, CLIP image 0.9, drawn once per batch; sampling 12 steps, CFG 8 on the logits, temperature
0.7 -> 0.3, text to image (no CLIP image). The paper reports FID-COCO-30k 11.07 at 12 steps.
Ours / departures:
- COCO captions, one (image, caption) pair per item, instead of the paper's filtered LAION-style
  web data; the ADM centre crop at 256 px instead of Resize(256) + RandomCrop(256); no flips;
- captions are cut at 256 ByT5 ids (`data.caption_max_ids`; COCO captions are short) and their
  padding is masked, where Paella pads each batch to its longest caption and attends to it;
- `--mode sample` puts each val image next to a sample from its caption; the COCO-30k FID
  evaluation is not wired yet.
Args: vq, byt5, clip, path, steps, batch, tiny (a seconds-long smoke run on a 16 px tokenizer of
`configs/paella_vq_digits.py:tiny`, for the tests).
"""
from ardiff_jax import configlib
from ardiff_jax.methods import vq_tokenizer
from ardiff_jax.methods.paella import paella_base_config


def get_config(arg=None):
  a = configlib.parse_arg(arg, vq="workdirs/paella_vq_f4", byt5="weights/byt5-xl",
                          clip="weights/CLIP-ViT-H-14-laion2B-s32B-b79K", path="data/coco",
                          steps=1_500_000, batch=2048, tiny=False)
  c = paella_base_config("paella_1b", a.batch)
  c.paella.cond = "byt5+clip"
  c.paella.tokenizer_workdir = a.vq
  c.paella.byt5_path = a.byt5
  c.paella.clip_path = a.clip
  c.tokenizer = vq_tokenizer.tokenizer_config("paella_f4")
  c.data.source = "coco"
  c.data.path = a.path
  c.data.train_split, c.data.eval_split = "train", "val"
  c.data.image_size = 256
  c.data.random_flip = False
  c.data.num_classes = 1
  c.data.clip_tokenizer = a.clip
  c.train.num_steps = a.steps
  c.train.compute_dtype = "bfloat16"
  c.train.log_every = 500
  c.train.ckpt_every = 10_000
  c.sample.num_samples, c.sample.batch_size = 64, 64
  if a.tiny:
    c.paella.preset = "paella_tiny"
    c.paella.steps = 4
    c.tokenizer = vq_tokenizer.tokenizer_config("paella_tiny")
    c.tokenizer.overrides = dict(c_hidden=16, bottleneck_blocks=1, codebook_size=64)
    c.data.image_size = 16
    c.data.caption_max_ids = 48
    c.train.compute_dtype = "float32"
    c.train.num_steps, c.train.batch_size, c.train.log_every, c.train.ckpt_every = 3, 8, 1, 3
    c.optim.warmup_steps = 1
    c.sample.num_samples, c.sample.batch_size = 8, 8
  return c
