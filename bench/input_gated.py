"""Would a recurrent cell whose gates depend only on its input (minGRU) train faster on a CPU?

    python bench/input_gated.py [--batch 32] [--rounds 3]

The idea (Feng et al. 2024, "Were RNNs all we needed?"): with z_t and the candidate computed from x_t
alone, the whole chunk's gates are one large matrix product, and what is left over time is the
elementwise recurrence h_t = (1 - z_t) h_{t-1} + z_t c_t. This times full training steps (forward,
cross-entropy, backward, AdamW) of charlm's GRU (nn.GRU, the fused kernel) against two minGRU forms
at the same widths, at batch 32 x 128 characters, in the precision charlm's `auto` picks here:
- the log-space parallel scan of the paper (cumsum + logcumsumexp over the chunk);
- a plain time loop over the elementwise recurrence (the matrix products stay whole-chunk).
A minGRU layer has no hidden-to-hidden matrix, so at equal width it has about a quarter of the GRU's
weights; what it would have to buy is characters per second. The median of --rounds rounds, cases
alternating within each round. Writes bench/results/<name>.json with the machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from report import finish, machine  # noqa: E402

from charlm.device import autocast, resolve_precision  # noqa: E402
from charlm.model import CharRNN, ModelConfig  # noqa: E402

VOCAB, SEQ = 73, 128  # the 1.1M-character plays' vocabulary; charlm's truncated-BPTT length


def log_g(x: torch.Tensor) -> torch.Tensor:
    """log of the paper's positive activation g(x) = x + 0.5 for x >= 0, sigmoid(x) below."""
    return torch.where(x >= 0, (F.relu(x) + 0.5).log(), -F.softplus(-x))


class MinGRULayer(nn.Module):
    def __init__(self, inputs: int, hidden: int, scan: str) -> None:
        super().__init__()
        self.gates = nn.Linear(inputs, 2 * hidden)
        self.hidden, self.scan = hidden, scan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, cand = self.gates(x).float().chunk(2, dim=-1)  # [B, T, H] each, for the whole chunk at once
        if self.scan == "log":
            log_z, log_keep = -F.softplus(-k), -F.softplus(k)
            h0 = torch.zeros(x.shape[0], 1, self.hidden)
            values = torch.cat([log_g(h0), log_z + log_g(cand)], dim=1)
            a_star = F.pad(torch.cumsum(log_keep, dim=1), (0, 0, 1, 0))
            return torch.exp(a_star + torch.logcumsumexp(values - a_star, dim=1))[:, 1:]
        z = torch.sigmoid(k)
        keep, add = 1 - z, z * torch.tanh(cand)
        h, outs = torch.zeros(x.shape[0], self.hidden), []
        for t in range(x.shape[1]):
            h = keep[:, t] * h + add[:, t]
            outs.append(h)
        return torch.stack(outs, dim=1)


class MinGRU(nn.Module):
    def __init__(self, layers: int, hidden: int, scan: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 64)
        self.layers = nn.ModuleList(MinGRULayer(64 if i == 0 else hidden, hidden, scan) for i in range(layers))
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class GRU(nn.Module):
    def __init__(self, layers: int, hidden: int) -> None:
        super().__init__()
        self.net = CharRNN(ModelConfig(vocab_size=VOCAB, hidden_size=hidden, num_layers=layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids)[0]


def chars_per_sec(net: nn.Module, batch: int, precision: str, steps: int = 6) -> float:
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    ids = torch.randint(VOCAB, (batch, SEQ + 1), generator=torch.Generator().manual_seed(0))
    began = 0.0
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            began = time.perf_counter()
        with autocast(torch.device("cpu"), precision):
            logits = net(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch * SEQ / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name")
    args = parser.parse_args()
    precision = resolve_precision("auto", torch.device("cpu"))
    cases = {
        "GRU 2x384 (nn.GRU, charlm's 20-minute model)": lambda: GRU(2, 384),
        "minGRU 2x384, log-space scan": lambda: MinGRU(2, 384, "log"),
        "minGRU 2x384, time loop": lambda: MinGRU(2, 384, "loop"),
        "minGRU 3x768, time loop": lambda: MinGRU(3, 768, "loop"),
    }
    nets = {name: make() for name, make in cases.items()}
    speeds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, net in nets.items():
            speeds[name].append(chars_per_sec(net, args.batch, precision))
    base = statistics.median(speeds[next(iter(cases))])
    rows = [["cell", "parameters", "chars/s", "vs GRU"]]
    results: dict = {"machine": machine(), "precision": precision, "batch": args.batch, "seq_len": SEQ, "cases": {}}
    for name, net in nets.items():
        speed = statistics.median(speeds[name])
        params = sum(p.numel() for p in net.parameters())
        rows.append([name, f"{params:,}", f"{speed:,.0f}", f"{speed / base:.2f}x"])
        results["cases"][name] = {"params": params, "chars_per_sec": speed, "rounds": speeds[name]}
    title = f"training chars/s, batch {args.batch} x {SEQ}, {precision}, {results['machine']['cpu']}"
    finish(title, rows, results, args.name or f"input-gated-{dt.date.today()}")


if __name__ == "__main__":
    main()
