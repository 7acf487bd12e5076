"""Tokenise the embedded MNIST digits for a downstream transformer, then train a small prior on the token ids.

    python examples/tokenize_dataset.py --model outputs/demo [--num-images 2000] [--output-dir outputs/mnist-tokens]

Every digit becomes C token ids (column `token_ids`, the smallest integer type that holds K) beside its `label`;
the result is saved with `save_to_disk`. A few steps of a class-conditional prior (`QGPriorForCausalLM`, a small
Llama decoder) on batches of the saved tokens show how a transformer consumes them.
"""

import argparse
import math

import torch
from datasets import DatasetDict, load_from_disk
from torch.utils.data import DataLoader

from qg_tokenizer import QGPriorConfig, QGPriorForCausalLM
from qg_tokenizer.data import load_embedded_mnist
from qg_tokenizer.tokenize import load_tokenizer, tokenize_dataset

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--model", default="outputs/demo", help="saved QG-VAE folder or hub repo id")
parser.add_argument("--num-images", type=int, help="tokenise only the first N digits of each split")
parser.add_argument("--output-dir", default="outputs/mnist-tokens", help="where save_to_disk writes the tokens")
parser.add_argument("--prior-steps", type=int, default=20, help="training steps of the demonstration prior")
args = parser.parse_args()

model, processor = load_tokenizer(args.model)
mnist = load_embedded_mnist()  # train / test, columns image (PIL) and label
if args.num_images:
    mnist = DatasetDict({split: ds.select(range(min(args.num_images, len(ds)))) for split, ds in mnist.items()})
tokens = tokenize_dataset(mnist, model, processor, batch_size=128)  # keeps "label", drops "image"
tokens.save_to_disk(args.output_dir)
print(tokens)
print(f"features: {tokens['train'].features}")

# --- what a downstream transformer sees: [B, C] ids per batch, read back from disk
train = load_from_disk(args.output_dir)["train"].with_format("torch")
loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
torch.manual_seed(0)
prior = QGPriorForCausalLM(QGPriorConfig(
    num_image_tokens=model.config.num_tokens, codebook_size=model.config.codebook_size, num_classes=10,
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
))  # fmt: skip
optimizer = torch.optim.AdamW(prior.parameters(), lr=1e-3)
batches = iter(loader)
for step in range(args.prior_steps):
    try:
        batch = next(batches)
    except StopIteration:
        batches = iter(loader)
        batch = next(batches)
    input_ids = prior.prepare_input_ids(batch["token_ids"].long(), batch["label"])  # [B, 1 + C]: class, then tokens
    loss = prior(input_ids, labels=input_ids).loss  # nats per image token
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step == 0 or step == args.prior_steps - 1:
        print(f"prior step {step + 1}: {loss.item() / math.log(2):.3f} bits per token")
