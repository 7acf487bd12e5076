"""Encode images into QG-VAE token ids and decode them back, from all C tokens and from their first k.

    python examples/encode_decode.py --model outputs/demo [--num-images 8] [--output encode_decode.png]

`--model` is a folder written by `training/train.py` (or `save_pretrained`) or a hub repo id. Prints the token ids
and, per prefix length k, the bytes an image costs and the reconstruction PSNR; saves a grid (top row: inputs, then
the reconstructions from k = 1, 2, 4, ..., C tokens).
"""

import argparse

import torch
from transformers import AutoImageProcessor, AutoModel

import qg_tokenizer  # noqa: F401  (registers the QG-VAE with the Auto classes)
from qg_tokenizer.codec import payload_num_bytes
from qg_tokenizer.data import load_embedded_mnist
from qg_tokenizer.metrics import psnr
from qg_tokenizer.visualize import image_grid, prefix_lengths

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--model", default="outputs/demo", help="saved QG-VAE folder or hub repo id")
parser.add_argument("--num-images", type=int, default=8, help="test digits to encode")
parser.add_argument("--output", default="encode_decode.png", help="where to save the grid")
args = parser.parse_args()

model = AutoModel.from_pretrained(args.model).eval()
processor = AutoImageProcessor.from_pretrained(args.model)
num_tokens, codebook_size = model.config.num_tokens, model.config.codebook_size

images = load_embedded_mnist()["test"].select(range(args.num_images))["image"]
pixel_values = processor(list(images), return_tensors="pt")["pixel_values"]  # [B, ch, S, S] in [0, 1]

with torch.no_grad():
    token_ids = model.encode(pixel_values).token_ids  # [B, C] int64, token c indexes codebook c
    print(f"token_ids {list(token_ids.shape)} in [0, {codebook_size}); image 0: {token_ids[0].tolist()}")
    rows = [pixel_values]
    for k in prefix_lengths(num_tokens):
        reconstruction = model.decode(token_ids, prefix_length=k).pixel_values  # [B, ch, S, S], not clamped
        rows.append(reconstruction)
        quality = psnr(reconstruction, pixel_values).mean().item()
        print(f"{k:4d} tokens = {payload_num_bytes(k, codebook_size):4d} bytes: PSNR {quality:6.2f} dB")

image_grid(rows).save(args.output)
print(f"saved {args.output}")
