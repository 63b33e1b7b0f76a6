"""Train a tiny character-level GPT on bundled public-domain text, with tfkernels or plain PyTorch.

    python examples/train_tiny_gpt.py --impl tfkernels        # fused kernels (tfkernels.nn blocks)
    python examples/train_tiny_gpt.py --impl eager            # the same model from plain torch modules
    python examples/train_tiny_gpt.py --plot examples/loss_curves.png   # both, same seed, one PNG
    python examples/train_tiny_gpt.py --preset gpu            # a larger model for a GPU (bf16 autocast)

Both implementations have the same parameters under the same names (the tfkernels
modules keep nn.MultiheadAttention's and the MLP's state_dict keys) and start from the
same weights, so from the same seed their loss curves agree within float round-off.
The text is Genesis and Exodus (King James Version, public domain), examples/data/.
"""
import argparse
import math
import resource
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DATA = Path(__file__).resolve().parent / "data" / "kjv_genesis_exodus.txt"

try:  # run from a source checkout built in place (setup.py build_ext --inplace): find tfkernels there
    import tfkernels  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class Config:
    d_model: int = 128
    n_head: int = 4
    n_layer: int = 4
    context: int = 128
    batch: int = 16
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 20
    eval_every: int = 50
    eval_batches: int = 4
    amp: bool = False  # bf16 autocast (GPU preset)


PRESETS = {
    "cpu": Config(),  # under 2 minutes for one implementation on 2 CPU cores
    "gpu": Config(d_model=384, n_head=6, n_layer=6, context=256, batch=64, steps=2000, lr=1e-3, warmup=100,
                  eval_every=250, eval_batches=20, amp=True),
    "test": Config(d_model=32, n_head=2, n_layer=2, context=16, batch=4, steps=5, warmup=2, eval_every=5,
                   eval_batches=1),
}


# --------------------------------------------------------------------------- data

class CharData:
    def __init__(self, path=DATA, split=0.9):
        text = path.read_text(encoding="utf-8")
        self.chars = sorted(set(text))
        index = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        cut = int(len(ids) * split)
        self.train, self.val = ids[:cut], ids[cut:]

    @property
    def vocab_size(self):
        return len(self.chars)

    def batch(self, split, batch, context, generator, device):
        ids = self.train if split == "train" else self.val
        start = torch.randint(len(ids) - context - 1, (batch,), generator=generator)
        rows = torch.stack([ids[s:s + context + 1] for s in start.tolist()])
        rows = rows.to(device)
        return rows[:, :-1], rows[:, 1:]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


# --------------------------------------------------------------------------- model

class EagerSelfAttention(nn.Module):
    """Causal self-attention from plain torch: nn.MultiheadAttention (which runs SDPA)."""

    def __init__(self, d_model, n_head):
        super().__init__()
        self.mha = nn.MultiheadAttention(d_model, n_head, batch_first=True)

    def forward(self, x):
        seqlen = x.shape[1]
        mask = torch.ones(seqlen, seqlen, dtype=torch.bool, device=x.device).triu(1)
        return self.mha(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]


class EagerMLP(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.linear2(F.gelu(self.linear1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm GPT block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, d_model, n_head, impl):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        if impl == "tfkernels":
            import tfkernels.nn as tnn

            self.attn = tnn.SelfAttention(d_model, n_head, is_causal=True)
            self.mlp = tnn.FusedMLP(d_model, 4 * d_model, approximate="tanh")
        else:
            self.attn = EagerSelfAttention(d_model, n_head)
            self.mlp = EagerMLP(d_model, 4 * d_model)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab_size, cfg, impl):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head, impl) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _eager_to_tfkernels_key(name):
    return name.replace("attn.mha.", "attn.")


def build_model(vocab_size, cfg, impl, seed, device):
    """Both implementations get the same initial weights: drawn once for the eager model."""
    torch.manual_seed(seed)
    eager = TinyGPT(vocab_size, cfg, "eager")
    if impl == "eager":
        return eager.to(device)
    model = TinyGPT(vocab_size, cfg, "tfkernels")
    model.load_state_dict({_eager_to_tfkernels_key(k): v for k, v in eager.state_dict().items()})
    return model.to(device)


# --------------------------------------------------------------------------- training

def _peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the whole process


@torch.no_grad()
def _evaluate(model, data, cfg, device, generator):
    model.eval()
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = data.batch("val", cfg.batch, cfg.context, generator, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            logits = model(x)
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def train(impl, cfg=None, seed=0, device="cpu", progress=True, data=None):
    """Train one implementation; returns a dict with per-step losses, eval losses and timings."""
    cfg = cfg or PRESETS["cpu"]
    device = torch.device(device)
    data = data or CharData()
    model = build_model(data.vocab_size, cfg, impl, seed, device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    batches = torch.Generator().manual_seed(seed)  # same batches for both implementations
    evals = torch.Generator().manual_seed(seed + 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no progress bar then
        def tqdm(iterable, **_):
            return _NoBar(iterable)

    losses, val_losses = [], []
    tokens_per_step = cfg.batch * cfg.context
    timed_tokens, timed_seconds = 0, 0.0
    bar = tqdm(range(cfg.steps), desc=f"{impl:>9}", disable=not progress, file=sys.stdout, dynamic_ncols=True)
    start = time.perf_counter()
    for step in bar:
        t0 = time.perf_counter()
        x, y = data.batch("train", cfg.batch, cfg.context, batches, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())  # syncs: the timing below covers whole steps
        if step >= min(3, cfg.steps - 1):  # the first steps warm up allocators and caches
            timed_tokens += tokens_per_step
            timed_seconds += time.perf_counter() - t0
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val_losses.append((step + 1, _evaluate(model, data, cfg, device, evals)))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{timed_tokens / max(timed_seconds, 1e-9):,.0f}")
    bar.close()
    return {
        "impl": impl,
        "losses": losses,
        "val_losses": val_losses,
        "tokens_per_s": timed_tokens / max(timed_seconds, 1e-9),
        "wall_s": time.perf_counter() - start,
        "peak_memory_mb": _peak_memory_mb(device),
        "model": model,
        "data": data,
    }


class _NoBar:
    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **_):
        pass

    def close(self):
        pass


@torch.no_grad()
def sample(model, data, cfg, device, length=200, prompt="Ge1:1 ", seed=0):
    index = {c: i for i, c in enumerate(data.chars)}
    idx = torch.tensor([[index[c] for c in prompt]], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    for _ in range(length):
        logits = model(idx[:, -cfg.context:])[:, -1].float()
        nxt = torch.multinomial(torch.softmax(logits / 0.8, dim=-1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    return data.decode(idx[0].tolist())


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    styles = {"eager": dict(color="tab:blue", lw=2.2, alpha=0.7), "tfkernels": dict(color="tab:orange", lw=1.0)}
    for r in results:
        label = f"{r['impl']} ({r['tokens_per_s']:,.0f} tok/s)"
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"train, {label}", **styles[r["impl"]])
        steps, vals = zip(*r["val_losses"])
        ax.plot(steps, vals, "o--", label=f"val, {r['impl']}", ms=4, **styles[r["impl"]])
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=["eager", "tfkernels", "both"], default="tfkernels")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, help="override the preset's number of steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="PNG", help="train both implementations and plot their loss curves")
    parser.add_argument("--sample", type=int, default=0, metavar="N", help="print N sampled characters at the end")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    cfg = PRESETS[args.preset]
    if args.steps:
        cfg = replace(cfg, steps=args.steps, eval_every=min(cfg.eval_every, args.steps))
    impls = ["eager", "tfkernels"] if (args.plot or args.impl == "both") else [args.impl]
    device = torch.device(args.device)
    print(f"tiny GPT: d_model={cfg.d_model} heads={cfg.n_head} layers={cfg.n_layer} context={cfg.context} "
          f"batch={cfg.batch} steps={cfg.steps} device={device} threads={torch.get_num_threads()}"
          f"{' bf16-autocast' if cfg.amp else ''}")
    data, results = CharData(), []
    for impl in impls:
        r = train(impl, cfg, seed=args.seed, device=device, progress=not args.no_progress, data=data)
        results.append(r)
        mem = "peak memory (max_memory_allocated)" if device.type == "cuda" else "peak RSS (ru_maxrss, process)"
        print(f"{impl:>9}: final loss {r['losses'][-1]:.4f}  val loss {r['val_losses'][-1][1]:.4f}  "
              f"{r['tokens_per_s']:,.0f} tokens/s  wall {r['wall_s']:.1f} s  {mem} {r['peak_memory_mb']:,.0f} MiB")
        if args.sample:
            print(sample(r["model"], data, cfg, device, length=args.sample, seed=args.seed))
    if len(results) == 2:
        diff = max(abs(a - b) for a, b in zip(results[0]["losses"], results[1]["losses"]))
        print(f"max |loss(eager) - loss(tfkernels)| over {cfg.steps} steps: {diff:.2e}")
    if args.plot:
        title = (f"tiny GPT on Genesis+Exodus (KJV), {cfg.n_layer}x{cfg.d_model}, context {cfg.context}, "
                 f"{device.type}")
        plot(results, args.plot, title)
        print(f"wrote {args.plot}")
    return results


if __name__ == "__main__":
    main()
