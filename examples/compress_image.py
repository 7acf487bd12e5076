"""Compress an image into a few bytes with a QG-VAE, and decompress it fully and from a truncated stream.

    python examples/compress_image.py --model outputs/demo [--image digit.png] [--output-dir compressed]

Without `--image` the first embedded MNIST test digit is used. Writes `image.qgt` (header + C*log2(K) bits),
`reconstruction.png`, and for k = 1, 2, 4, ... `prefix-{k}.png` decoded from the stream cut after k tokens (what a
receiver can show while the rest is still on its way). Prints the sizes next to the PNG size of the input.
"""

import argparse
import io
from pathlib import Path

import PIL.Image
from transformers import AutoImageProcessor, AutoModel

import qg_tokenizer  # noqa: F401  (registers the QG-VAE with the Auto classes)
from qg_tokenizer.codec import HEADER_NUM_BYTES, decode_tokens, truncate
from qg_tokenizer.data import load_embedded_mnist
from qg_tokenizer.metrics import psnr
from qg_tokenizer.visualize import prefix_lengths

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--model", default="outputs/demo", help="saved QG-VAE folder or hub repo id")
parser.add_argument("--image", help="image file (default: an embedded MNIST test digit)")
parser.add_argument("--output-dir", default="compressed", help="folder for the .qgt file and the PNGs")
args = parser.parse_args()

model = AutoModel.from_pretrained(args.model).eval()
processor = AutoImageProcessor.from_pretrained(args.model)
image = PIL.Image.open(args.image) if args.image else load_embedded_mnist()["test"][0]["image"]
pixel_values = processor(image, return_tensors="pt")["pixel_values"]  # [1, ch, S, S]
png = io.BytesIO()
processor.postprocess(pixel_values)[0].save(png, format="PNG")

output_dir = Path(args.output_dir)
output_dir.mkdir(parents=True, exist_ok=True)
stream = model.compress(pixel_values)[0]  # bytes: 20-byte header + ceil(C log2 K / 8) payload
(output_dir / "image.qgt").write_bytes(stream)
print(f"{model.config.image_size}px input: PNG {png.tell()} bytes, QG-VAE stream {len(stream)} bytes "
      f"({HEADER_NUM_BYTES} header + {len(stream) - HEADER_NUM_BYTES} payload)")

data = (output_dir / "image.qgt").read_bytes()
for k in prefix_lengths(model.config.num_tokens):
    prefix = truncate(data, k)  # what has arrived after k tokens
    reconstruction = model.decompress([prefix])
    name = "reconstruction.png" if k == decode_tokens(data).prefix_length else f"prefix-{k}.png"
    processor.postprocess(reconstruction)[0].save(output_dir / name)
    print(f"{k:4d} tokens: {len(prefix) - HEADER_NUM_BYTES:4d} payload bytes, "
          f"PSNR {psnr(reconstruction, pixel_values).item():6.2f} dB -> {name}")
