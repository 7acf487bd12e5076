"""Model speed: encode/decode throughput, training-step time (fp32, bf16), FLOPs and achieved fraction of peak.

    python benchmarks/bench_model.py [--presets mnist-cpu photos32-cpu cifar10-demo] [--batch-size 32] [--repeats 5]

The peak is a dense fp32 matmul measured in the same run on the same threads, so the fraction is a ratio of two
measurements taken side by side. Writes benchmarks/results/bench_model.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from qg_tokenizer import QGVAEConfig, QGVAEModel


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_flops(repeats: int, size: int = 2048) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / median_seconds(lambda: a @ b, repeats)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_preset(name: str, batch_size: int, repeats: int, peak: float) -> dict:
    torch.manual_seed(0)
    config = QGVAEConfig.from_preset(name)
    model = QGVAEModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.01)
    x = torch.rand(batch_size, config.num_channels, config.image_size, config.image_size)

    def train_step(dtype: torch.dtype | None = None) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            loss = model(x).loss
        loss.backward()
        model.accumulate_reset_statistic()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():
        token_ids = model.encode(x).token_ids
        encode_s = median_seconds(lambda: model.encode(x), repeats)
        decode_s = median_seconds(lambda: model.decode(token_ids), repeats)
        encode_flops = count_flops(lambda: model.encode(x))
        decode_flops = count_flops(lambda: model.decode(token_ids))
    model.train()
    step_flops = count_flops(train_step)
    step_fp32 = median_seconds(train_step, repeats)
    step_bf16 = median_seconds(lambda: train_step(torch.bfloat16), repeats)
    return {
        "preset": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes_per_image": config.bytes_per_image,
        "batch_size": batch_size,
        "encode_images_per_s": batch_size / encode_s,
        "decode_images_per_s": batch_size / decode_s,
        "train_step_s_fp32": step_fp32,
        "train_step_s_bf16": step_bf16,
        "train_gflops_per_image": step_flops / batch_size / 1e9,
        "encode_gflops_per_image": encode_flops / batch_size / 1e9,
        "decode_gflops_per_image": decode_flops / batch_size / 1e9,
        "train_fraction_of_matmul_peak": step_flops / step_fp32 / peak,
        "encode_fraction_of_matmul_peak": encode_flops / encode_s / peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["mnist-cpu", "photos32-cpu", "cifar10-demo"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "bench_model.json")
    args = parser.parse_args()

    peak = matmul_peak_flops(args.repeats)
    rows = [bench_preset(name, args.batch_size, args.repeats, peak) for name in args.presets]
    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_peak_gflops": peak / 1e9,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": rows,
    }
    header = f"{'preset':14} {'params':>9} {'enc img/s':>9} {'dec img/s':>9} {'step fp32':>9} {'step bf16':>9} "
    header += f"{'GFLOP/img':>9} {'% peak':>7}"
    print(f"dense matmul peak: {peak / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    print(header)
    for r in rows:
        print(
            f"{r['preset']:14} {r['parameters']:>9,} {r['encode_images_per_s']:>9.0f} {r['decode_images_per_s']:>9.0f} "
            f"{r['train_step_s_fp32']:>8.3f}s {r['train_step_s_bf16']:>8.3f}s {r['train_gflops_per_image']:>9.3f} "
            f"{100 * r['train_fraction_of_matmul_peak']:>6.1f}%"
        )
    print(f"peak RSS {result['peak_rss_mib']:.0f} MiB")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
