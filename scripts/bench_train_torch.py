#!/usr/bin/env python3
"""PyTorch side of `scripts/bench-train --torch`: the same cases as the candle benchmark
(models/benches/train_steps.rs), same shapes, optimizers and thread count, one fixed random
batch each, printed as `<case>: <X> ms/step (forward+loss A, backward B, optimizer C)`.

    python3 scripts/bench_train_torch.py --threads 2 [--seconds 3]
    python3 scripts/bench_train_torch.py --compare CANDLE_OUT TORCH_OUT   # ratio table

`--compare` needs no PyTorch: it reads both sides' printed lines (several rounds each) and
prints, per case, the best time of each side and their ratio.
"""

import argparse
import math
import sys
import time


def best_times(path):
    """Case name -> smallest ms/step among the lines `<case>: <X> ms/step ...` in a file."""
    best = {}
    for line in open(path):
        if " ms/step" not in line or ": " not in line:
            continue
        name, rest = line.split(": ", 1)
        ms = float(rest.split(" ms/step")[0])
        best[name] = min(ms, best.get(name, ms))
    return best


def compare(candle_path, torch_path):
    candle, torch_ = best_times(candle_path), best_times(torch_path)
    print(f"\n{'case':<40} {'candle':>10} {'PyTorch':>10} {'ratio':>7}")
    for name, ms in candle.items():
        if name in torch_:
            print(f"{name:<40} {ms:>7.2f} ms {torch_[name]:>7.2f} ms {ms / torch_[name]:>6.2f}x")
    print("(best of the alternating rounds; ratio = candle / PyTorch step time)")


if "--compare" in sys.argv:
    i = sys.argv.index("--compare")
    compare(sys.argv[i + 1], sys.argv[i + 2])
    sys.exit(0)

import torch  # noqa: E402 (only the benchmark itself needs PyTorch)
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class Mlp(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class Block(nn.Module):
    """Pre-norm block as in models/src/transformer.rs: explicit causal attention, tanh GELU."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x, mask):
        b, t, c = x.shape
        hd = c // self.heads
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.reshape(b, t, self.heads, hd).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd) + mask, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class CharTransformer(nn.Module):
    def __init__(self, vocab, context, dim, heads, layers):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)
        mask = torch.full((context, context), -1e9).triu(1)
        self.register_buffer("mask", mask)

    def forward(self, tokens):
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos(torch.arange(t))
        for block in self.blocks:
            x = block(x, self.mask[:t, :t])
        return self.head(self.ln_f(x))


def cases():
    vocab = 96  # printable ASCII plus "unknown", as in the candle benchmark
    b, t = 16, 64
    ids = torch.arange(b * t).reshape(b, t)
    yield ("mlp-784-512-512-10 b128 adamw", Mlp([784, 512, 512, 10]),
           lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0),
           torch.rand(128, 784), torch.arange(128) % 10)
    yield ("digits-mlp-64-64-10 b32 sgd-momentum", Mlp([64, 64, 10]),
           lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
           torch.rand(32, 64), torch.arange(32) % 10)
    yield ("char-transformer-2x64-ctx64 b16 adamw", CharTransformer(vocab, t, 64, 4, 2),
           lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0),
           (ids * 7) % vocab, (ids * 7 + 1) % vocab)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    print(f"PyTorch {torch.__version__}, CPU, {torch.get_num_threads()} threads")
    for name, model, make_opt, x, y in cases():
        opt = make_opt(model)

        def step():
            t0 = time.perf_counter()
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss.item()
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            return t1 - t0, t2 - t1, time.perf_counter() - t2

        for _ in range(3):
            step()
        steps, phases = 0, [0.0, 0.0, 0.0]
        started = time.perf_counter()
        while steps < 5 or time.perf_counter() - started < args.seconds:
            for i, t in enumerate(step()):
                phases[i] += t
            steps += 1
        ms = lambda s: s * 1e3 / steps
        print(f"{name}: {ms(time.perf_counter() - started):.2f} ms/step "
              f"(forward+loss {ms(phases[0]):.2f}, backward {ms(phases[1]):.2f}, optimizer {ms(phases[2]):.2f})")


if __name__ == "__main__":
    main()
