"""Long-CLIP against stock transformers CLIP: text-feature extraction and a training step.

Modes, each run in its own subprocess (so peak RSS is per mode):

* ``text``: ``get_text_features`` in inference mode at exactly 77 and exactly 248 tokens, for three models holding
  the SAME weights: our ``LongCLIPModel``, the stock ``CLIPTextModel`` from ``model.to_text_model()`` (its pooled
  output through a copy of the text projection, so the work is identical) and the stock ``CLIPModel`` from
  ``model.to_clip_model()``. At each length the three models are timed in interleaved rounds (a new random order
  every round) after a warm-up, so machine noise hits all of them alike; the median ms per batch and the ratio
  ours / stock at each length are reported, with the largest output difference as a sanity check. DESIGN.md's
  target: ratio <= 1.02 at 248 tokens. ``--profile`` adds a torch.profiler table of one 248-token batch and the time
  of the position-embedding lookup alone (``FrozenPrefixEmbedding`` vs ``nn.Embedding``).
* ``step_stock``: a stock ``CLIPModel`` (248 text positions) training step on the batch's images and long captions
  padded to the batch's longest caption, CLIP's InfoNCE: the floor of DESIGN.md's performance table.
* ``step_longclip``: a ``LongCLIPModel`` step on the same images and long captions plus short captions encoded at
  their own length (~20 tokens), Long-CLIP's loss (long InfoNCE + PCA-image / short InfoNCE, label smoothing 0.1).
* ``step_interleaved`` (not in the default list; needs both models in memory, about 2x the RAM): the two steps
  alternating in one process, so both see the same load.

Timing on a shared CPU. Every timed call records wall time and process CPU time (``time.process_time``, all
threads). The children run with ``OMP_WAIT_POLICY=PASSIVE`` by default (``--omp-wait-policy``): with OpenMP's
default busy-waiting, a 2-thread forward that shares its 2 cores with other processes spends most of its time
spinning at barriers (measured here on a text-tower forward: 3.4-4.2 s, against 1.4-1.5 s on a free machine and
1.2-1.6 s with passive waiting under the same load), which swamps any 2% effect in both clocks. With passive waiting, CPU time counts the work done and is the steadier clock under load; on an idle
machine the two agree. Both clocks are printed; both models always run under the same policy.

A training step is forward + backward + AdamW step, fp32. Both step models are built from the same seed and
config, so they start from the same weights. Peak memory is the process's peak RSS (``ru_maxrss``), also shown as
growth over the RSS after the model and batch were built. Target: Long-CLIP step <= 1.15x stock, peak RSS <= 1.3x.

Captions are random token ids (SOT, words, EOT; EOT is the largest id, as in CLIP): long ones of
``--long-min``..``--long-max`` tokens, short ones of ``--short-min``..``--short-max`` tokens. Weights are random.

Usage::

    python benchmarks/bench_longclip.py                  # ViT-B/16 shapes, text batch 32, train batch 16 (~4-5 min, 2 cores)
    python benchmarks/bench_longclip.py --quick          # same shapes, smaller batches, fewer rounds (~1 min)
    python benchmarks/bench_longclip.py --tiny           # tiny shapes: a smoke test of the script (seconds)
    python benchmarks/bench_longclip.py --modes text --device cuda --dtype fp16 --profile
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

FULL_VOCAB, TINY_VOCAB = 49408, 1000
LENGTHS = (77, 248)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def special_ids(args) -> tuple[int, int, int]:
    """(vocab size, start-of-text id, end-of-text id)."""
    vocab = TINY_VOCAB if args.tiny else FULL_VOCAB
    return vocab, vocab - 2, vocab - 1


def tower_configs(args, text_positions: int) -> dict:
    """ViT-B/16 towers (text: width 512, 12 layers, 8 heads; image: 768, 12, 12, 224 px / 16), or tiny ones."""
    vocab, sot, eot = special_ids(args)
    ids = dict(vocab_size=vocab, max_position_embeddings=text_positions, bos_token_id=sot, eos_token_id=eot,
               pad_token_id=eot)
    if args.tiny:
        text = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, **ids)
        vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      image_size=32, patch_size=8)
        return dict(text_config=text, vision_config=vision, projection_dim=32)
    text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8, **ids)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=16)
    return dict(text_config=text, vision_config=vision, projection_dim=512)


def token_batch(args, lengths: list[int], width: int, generator: torch.Generator):
    """(ids, attention mask) of captions with the given lengths (SOT + random words + EOT), padded with EOT."""
    _, sot, eot = special_ids(args)
    ids = torch.full((len(lengths), width), eot, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0] = sot
        ids[row, 1 : n - 1] = torch.randint(1, sot, (n - 2,), generator=generator)
        mask[row, :n] = 1
    return ids, mask


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall and process-CPU seconds of a block (CUDA work is synchronised before reading the clocks)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------- text features
def build_text_models(args, device, dtype):
    """Our LongCLIPModel (stretched from a random 77-position stock CLIP) and two stock models with its weights."""
    from transformers import CLIPConfig, CLIPModel

    from hf_longclip import LongCLIPModel

    torch.manual_seed(0)
    ours = LongCLIPModel.from_clip(CLIPModel(CLIPConfig(**tower_configs(args, 77))))
    stock_text = ours.to_text_model()  # a separate stock CLIPTextModel
    stock_projection = copy.deepcopy(ours.text_projection)  # CLIPTextModel has no projection: same work as ours
    stock_clip = ours.to_clip_model()  # a separate stock CLIPModel
    assert type(stock_text).__module__.startswith("transformers.") and type(stock_clip).__module__.startswith("transformers.")
    models = [m.to(device=device, dtype=dtype).eval() for m in (ours, stock_text, stock_projection, stock_clip)]
    ours, stock_text, stock_projection, stock_clip = models
    return {
        "ours": lambda ids, mask: ours.get_text_features(input_ids=ids, attention_mask=mask).pooler_output,
        "CLIPTextModel": lambda ids, mask: stock_projection(
            stock_text(input_ids=ids, attention_mask=mask).pooler_output
        ),
        "CLIPModel": lambda ids, mask: stock_clip.get_text_features(input_ids=ids, attention_mask=mask).pooler_output,
    }, ours, stock_text


def profile_position_lookup(ours, stock_text, device, repeats: int = 2000) -> dict:
    """Median µs of the position-embedding lookup alone: ours (FrozenPrefixEmbedding) vs stock nn.Embedding."""
    out = {}
    for length in LENGTHS:
        position_ids = ours.text_model.embeddings.position_ids[:, :length]
        for name, module in (("ours", ours.text_model.embeddings.position_embedding),
                             ("stock", stock_text.embeddings.position_embedding)):
            times = []
            for _ in range(repeats):
                sync(device)
                start = time.perf_counter()
                module(position_ids)
                sync(device)
                times.append(time.perf_counter() - start)
            out[f"{name}_{length}_us"] = statistics.median(times) * 1e6
    return out


def profile_ours(fns, inputs, device) -> str:
    """torch.profiler table of our 248-token batch, and the ops ours runs that the stock CLIPTextModel does not."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ids, mask = inputs[248]
    events = {}
    for name in ("ours", "CLIPTextModel"):
        with profile(activities=activities) as prof:
            fns[name](ids, mask)
            sync(device)
        events[name] = {e.key: e for e in prof.key_averages()}
        if name == "ours":
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    total = sum(e.self_cpu_time_total for e in events["ours"].values())
    extra = []
    for key, event in events["ours"].items():
        stock = events["CLIPTextModel"].get(key)
        calls = event.count - (stock.count if stock else 0)
        if calls > 0:
            extra.append(f"{key} x{calls} ({event.self_cpu_time_total / event.count * calls:.0f} us)")
    extra_us = sum(float(x.rsplit("(", 1)[1].split()[0]) for x in extra)
    return (table + f"\nops ours runs beyond the stock CLIPTextModel + projection (one 248-token batch): "
            f"{', '.join(extra) or 'none'}; {extra_us:.0f} us of {total:.0f} us self CPU ({100 * extra_us / max(total, 1):.4f}%)")


def run_text_mode(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    fns, ours, stock_text = build_text_models(args, device, dtype)
    gen = torch.Generator().manual_seed(1)
    inputs = {}
    for length in LENGTHS:  # every caption exactly `length` tokens (no padding)
        ids, mask = token_batch(args, [length] * args.text_batch, length, gen)
        inputs[length] = ids.to(device), mask.to(device)
    cells = [(length, name) for length in LENGTHS for name in fns]
    wall = {cell: [] for cell in cells}
    cpu = {cell: [] for cell in cells}
    max_diff = {}
    warm = min(4, args.text_batch)
    with torch.inference_mode():
        for length in LENGTHS:  # warm-up on a few rows (lazy initialisation, allocator), and the outputs agree
            ids, mask = inputs[length]
            outs = {name: fn(ids[:warm], mask[:warm]).float() for name, fn in fns.items()}
            for name in ("CLIPTextModel", "CLIPModel"):
                max_diff[f"{name}_{length}"] = float((outs["ours"] - outs[name]).abs().max())
        order_rng = random.Random(0)
        names = list(fns)
        for length in LENGTHS:
            # One untimed full-size call first: the first call after a change of length pays for new allocations.
            fns["CLIPModel"](*inputs[length])
            for _ in range(args.rounds):
                # A fresh order every round: a fixed (or rotated) order gives each model the same predecessor every
                # time, and the predecessor's cache / allocator state biases the time (seen at tiny shapes).
                order_rng.shuffle(names)
                for name in names:
                    with Clock(device) as clock:
                        fns[name](*inputs[length])
                    wall[(length, name)].append(clock.wall)
                    cpu[(length, name)].append(clock.cpu)
        lookup = profile_position_lookup(ours, stock_text, device) if args.profile else None
        table = profile_ours(fns, inputs, device) if args.profile else None
    result = {"mode": "text", "batch": args.text_batch, "device": args.device, "dtype": args.dtype,
              "rounds": args.rounds, "max_abs_diff": max_diff}
    for clock_name, times in (("wall", wall), ("cpu", cpu)):
        for length in LENGTHS:
            median = {name: statistics.median(times[(length, name)]) * 1e3 for name in fns}
            result[f"{clock_name}_ms_{length}"] = median
            fastest = {name: min(times[(length, name)]) * 1e3 for name in fns}
            result[f"{clock_name}_min_ms_{length}"] = fastest
            for stock in ("CLIPTextModel", "CLIPModel"):
                result[f"{clock_name}_ratio_{length}_vs_{stock}"] = median["ours"] / median[stock]
                result[f"{clock_name}_min_ratio_{length}_vs_{stock}"] = fastest["ours"] / fastest[stock]
                result[f"{clock_name}_pairwise_{length}_vs_{stock}"] = [
                    a / b for a, b in zip(times[(length, "ours")], times[(length, stock)])
                ]
    if lookup:
        result["position_lookup_us"] = lookup
    if table:
        result["profile"] = table
    return result


# ----------------------------------------------------------------------------------------------- training step
def training_batch(args) -> dict:
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    long_lengths = [rng.randint(args.long_min, args.long_max) for _ in range(args.train_batch)]
    short_lengths = [rng.randint(args.short_min, args.short_max) for _ in range(args.train_batch)]
    long_ids, long_mask = token_batch(args, long_lengths, max(long_lengths), gen)
    short_ids, short_mask = token_batch(args, short_lengths, max(short_lengths), gen)
    size = tower_configs(args, 248)["vision_config"]["image_size"]
    return {
        "pixel_values": torch.randn(args.train_batch, 3, size, size, generator=gen),
        "input_ids": long_ids,
        "attention_mask": long_mask,
        "short_input_ids": short_ids,
        "short_attention_mask": short_mask,
    }


def build_step(kind: str, args, device, batch):
    """A training-step closure for ``stock`` (CLIPModel, long captions only) or ``longclip`` (long + short)."""
    from transformers import CLIPConfig, CLIPModel

    from hf_longclip import LongCLIPConfig, LongCLIPModel

    torch.manual_seed(0)  # both models start from the same weights
    if kind == "stock":
        model = CLIPModel(CLIPConfig(**tower_configs(args, 248)))
        inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    else:
        model = LongCLIPModel(LongCLIPConfig(**tower_configs(args, 248)))
        inputs = batch
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step() -> float:
        loss = model(**inputs, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def run_step_mode(args) -> dict:
    device = torch.device(args.device)
    batch = {k: v.to(device) for k, v in training_batch(args).items()}
    step = build_step(args.mode.removeprefix("step_"), args, device, batch)
    rss_before = rss_mib()
    step()  # warm-up: allocations and optimizer state, so the timed steps are steady
    wall, cpu = [], []
    for _ in range(args.steps):
        with Clock(device) as clock:
            step()
        wall.append(clock.wall)
        cpu.append(clock.cpu)
    peak = peak_rss_mib()
    result = {
        "mode": args.mode,
        "step_s": statistics.median(wall),
        "min_step_s": min(wall),
        "all_steps_s": wall,
        "cpu_step_s": statistics.median(cpu),
        "all_cpu_steps_s": cpu,
        "peak_rss_mib": peak,
        "rss_growth_mib": peak - rss_before,
        "long_len": batch["input_ids"].shape[1],
        "short_len": batch["short_input_ids"].shape[1] if args.mode == "step_longclip" else None,
    }
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def run_step_interleaved_mode(args) -> dict:
    """Both models in one process; stock and Long-CLIP steps alternate (the order flips each round)."""
    device = torch.device(args.device)
    batch = {k: v.to(device) for k, v in training_batch(args).items()}
    steps = {kind: build_step(kind, args, device, batch) for kind in ("stock", "longclip")}
    for step in steps.values():
        step()  # warm-up
    wall = {kind: [] for kind in steps}
    cpu = {kind: [] for kind in steps}
    for round_index in range(args.steps):
        for kind in (("stock", "longclip") if round_index % 2 == 0 else ("longclip", "stock")):
            with Clock(device) as clock:
                steps[kind]()
            wall[kind].append(clock.wall)
            cpu[kind].append(clock.cpu)
    return {
        "mode": "step_interleaved",
        "wall_s": wall,
        "cpu_s": cpu,
        "wall_ratio": statistics.median(wall["longclip"]) / statistics.median(wall["stock"]),
        "cpu_ratio": statistics.median(cpu["longclip"]) / statistics.median(cpu["stock"]),
    }


# ----------------------------------------------------------------------------------------------- driver
def child_args(args, mode: str) -> list[str]:
    out = [sys.executable, os.path.abspath(__file__), "--mode", mode]
    for name in ("text_batch", "train_batch", "rounds", "steps", "long_min", "long_max", "short_min", "short_max",
                 "threads", "device", "dtype", "omp_wait_policy"):
        out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return out + (["--tiny"] if args.tiny else []) + (["--profile"] if args.profile else [])


def report(results: dict, args) -> None:
    shapes = "tiny" if args.tiny else "ViT-B/16"
    policy = args.omp_wait_policy or "unset"
    if "text" in results:
        r = results["text"]
        print(f"\ntext features ({shapes} text tower, batch {r['batch']}, {r['dtype']} {r['device']}, "
              f"{args.threads} threads, OMP_WAIT_POLICY {policy}, inference mode, {r['rounds']} interleaved rounds, "
              "median ms per batch; cpu = process CPU time / threads):")
        for length in LENGTHS:
            diff = max(r["max_abs_diff"][f"{n}_{length}"] for n in ("CLIPTextModel", "CLIPModel"))
            for clock in ("wall", "cpu"):
                ms = r[f"{clock}_ms_{length}"]
                scale = 1 if clock == "wall" else args.threads
                print(f"  {length:3d} tokens {clock:4s}: ours {ms['ours'] / scale:.1f} ms | stock CLIPTextModel "
                      f"{ms['CLIPTextModel'] / scale:.1f} ms | stock CLIPModel.get_text_features "
                      f"{ms['CLIPModel'] / scale:.1f} ms | ratio ours/CLIPTextModel "
                      f"{r[f'{clock}_ratio_{length}_vs_CLIPTextModel']:.3f}, ours/CLIPModel "
                      f"{r[f'{clock}_ratio_{length}_vs_CLIPModel']:.3f} (fastest-call ratios "
                      f"{r[f'{clock}_min_ratio_{length}_vs_CLIPTextModel']:.3f}, "
                      f"{r[f'{clock}_min_ratio_{length}_vs_CLIPModel']:.3f})"
                      + (f"; max |diff| {diff:.1e}" if clock == "cpu" else ""))
        if "position_lookup_us" in r:
            lk = r["position_lookup_us"]
            print("  position lookup alone: " + ", ".join(
                f"{length} tokens ours {lk[f'ours_{length}_us']:.1f} us vs stock {lk[f'stock_{length}_us']:.1f} us"
                for length in LENGTHS))
        if "profile" in r:
            print(r["profile"])
    stock, ours = results.get("step_stock"), results.get("step_longclip")
    if stock and ours:
        print(f"\ntraining step ({shapes} both towers, batch {args.train_batch}, fp32 {args.device}, {args.threads} "
              f"threads, OMP_WAIT_POLICY {policy}, one subprocess per model, median of {args.steps} steps after a "
              "warm-up; cpu = process CPU time / threads):")
        t = args.threads
        print(f"  stock CLIPModel step  wall {stock['step_s']:.2f} s, cpu {stock['cpu_step_s'] / t:.2f} s (long captions "
              f"padded to {stock['long_len']}), peak RSS {stock['peak_rss_mib']:.0f} MiB "
              f"(+{stock['rss_growth_mib']:.0f} MiB from the first step on)")
        print(f"  Long-CLIP step        wall {ours['step_s']:.2f} s, cpu {ours['cpu_step_s'] / t:.2f} s (long "
              f"{ours['long_len']} + short {ours['short_len']} tokens), peak RSS {ours['peak_rss_mib']:.0f} MiB "
              f"(+{ours['rss_growth_mib']:.0f} MiB from the first step on)")
        print(f"  ratio Long-CLIP/stock: step wall {ours['step_s'] / stock['step_s']:.3f}x, cpu "
              f"{ours['cpu_step_s'] / stock['cpu_step_s']:.3f}x, fastest steps wall "
              f"{ours['min_step_s'] / stock['min_step_s']:.3f}x, cpu "
              f"{min(ours['all_cpu_steps_s']) / min(stock['all_cpu_steps_s']):.3f}x (target <= 1.15x); peak RSS "
              f"{ours['peak_rss_mib'] / stock['peak_rss_mib']:.3f}x (target <= 1.3x)")
    if "step_interleaved" in results:
        r = results["step_interleaved"]
        print(f"  interleaved in one process ({args.steps} rounds): Long-CLIP/stock step wall {r['wall_ratio']:.3f}x, "
              f"cpu {r['cpu_ratio']:.3f}x; wall s stock {[round(x, 2) for x in r['wall_s']['stock']]} Long-CLIP "
              f"{[round(x, 2) for x in r['wall_s']['longclip']]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["text", "step_stock", "step_longclip"],
                        choices=["text", "step_stock", "step_longclip", "step_interleaved"])
    parser.add_argument("--quick", action="store_true", help="same shapes, text batch 8, train batch 4, fewer rounds")
    parser.add_argument("--tiny", action="store_true", help="tiny towers (a smoke test of the script)")
    parser.add_argument("--text-batch", type=int, default=None, help="text-feature batch (default 32)")
    parser.add_argument("--train-batch", type=int, default=None, help="training-step batch (default 16)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timed rounds of the text mode")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per mode (after one warm-up)")
    parser.add_argument("--long-min", type=int, default=100, help="shortest long caption, tokens incl. SOT/EOT")
    parser.add_argument("--long-max", type=int, default=200, help="longest long caption, tokens incl. SOT/EOT")
    parser.add_argument("--short-min", type=int, default=15)
    parser.add_argument("--short-max", type=int, default=25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="text-feature dtype (steps are fp32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        help="OMP_WAIT_POLICY of the timed subprocesses ('' leaves the environment's)")
    parser.add_argument("--profile", action="store_true", help="text mode: profiler table and position-lookup timing")
    parser.add_argument("--json", action="store_true", help="also print each mode's raw JSON")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    small = args.quick or args.tiny
    args.text_batch = args.text_batch or (8 if small else 32)
    args.train_batch = args.train_batch or (4 if small else 16)
    args.rounds = args.rounds or 3
    args.steps = args.steps or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)

    if args.mode:  # child process
        runners = {"text": run_text_mode, "step_interleaved": run_step_interleaved_mode}
        result = runners.get(args.mode, run_step_mode)(args)
        print(json.dumps(result))
        return

    env = dict(os.environ)
    if args.omp_wait_policy:  # read by the OpenMP runtime when a child starts
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    results = {}
    for mode in args.modes:
        start = time.perf_counter()
        out = subprocess.run(child_args(args, mode), capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"mode {mode} failed")
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"[{mode} done in {time.perf_counter() - start:.0f} s]", flush=True)
        if args.json:
            print(json.dumps({k: v for k, v in results[mode].items() if k != "profile"}))
    report(results, args)


if __name__ == "__main__":
    main()
