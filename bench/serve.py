"""`charlm serve` under load, on loopback: concurrent clients streaming samples from one model.

    python bench/serve.py --checkpoint checkpoints/shakespeare.safetensors
    python bench/serve.py --checkpoint m.safetensors --requests 200 --no-busy   # a quick look

Starts `charlm serve --port 0` as its own process, then (1) one client asking for samples one after
another, the baseline, and (2) --clients clients at once, until --requests samples of --length
characters have been served; with a CPU-bound neighbour (bench/contention.py's matmul loop) beside the
server for the second measurement unless --no-busy. Reports requests/s, characters/s in total, the
median and 95th-percentile time to first character, whether anything was dropped (every sample must
end with a `done` event after exactly --length characters) and the server's memory after the first
100 requests and at the end. Bounded: every request has a timeout and the whole run a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from contention import kill_group, matmul_neighbour  # noqa: E402
from report import finish, machine  # noqa: E402

DEADLINE_S = 900  # the whole benchmark


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(checkpoint: Path, max_generations: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "charlm",
            "serve",
            "--port",
            "0",
            "-c",
            str(checkpoint),
            "-q",
            "--max-generations",
            str(max_generations),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        raise RuntimeError(f"charlm serve did not start: {proc.stderr.read()[-2000:]}")
    return proc, url


async def one_sample(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    began = time.perf_counter()
    first, chars, done = None, 0, None
    async with client.stream("POST", url + "api/sample", json=body, timeout=120) as response:
        if response.status_code != 200:
            return {"ok": False, "status": response.status_code, "seconds": time.perf_counter() - began}
        kind = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if kind == "chars":
                    if first is None:
                        first = time.perf_counter() - began
                    chars += len(data["text"])
                elif kind in ("done", "error"):
                    done = (kind, data)
    ok = done is not None and done[0] == "done" and done[1]["chars"] == body["length"] == chars
    return {"ok": ok, "first_s": first, "seconds": time.perf_counter() - began, "chars": chars}


async def load(url: str, clients: int, requests: int, length: int, pid: int, seed: str) -> dict:
    """`clients` loops, each asking for a sample as soon as its last one ended, `requests` in all."""
    issued, results, memory = 0, [], {}

    async def client_loop(client: httpx.AsyncClient, k: int) -> None:
        nonlocal issued
        while issued < requests:
            issued += 1
            n = issued
            body = {"seed": seed, "length": length, "temperature": 1.0, "rng_seed": n}
            results.append(await one_sample(client, url, body))
            if len(results) == min(100, requests):
                memory.setdefault("after_100_mb", rss_mb(pid))
            if len(results) % 250 == 0:  # flat, or growing with the count of requests served?
                memory.setdefault("trace_mb", []).append([len(results), round(rss_mb(pid), 1)])

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        began = time.perf_counter()
        await asyncio.gather(*(client_loop(client, k) for k in range(clients)))
        elapsed = time.perf_counter() - began
    memory["end_mb"] = rss_mb(pid)
    firsts = sorted(r["first_s"] for r in results if r.get("first_s") is not None)
    dropped = sum(not r["ok"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "dropped": dropped,
        "seconds": elapsed,
        "requests_per_s": len(results) / elapsed,
        "chars_per_s": sum(r.get("chars", 0) for r in results) / elapsed,
        "first_char_median_ms": 1000 * statistics.median(firsts) if firsts else None,
        "first_char_p95_ms": 1000 * firsts[int(0.95 * (len(firsts) - 1))] if firsts else None,
        **memory,
    }


def row(name: str, r: dict, base: dict | None) -> list[str]:
    ratio = f"{r['chars_per_s'] / base['chars_per_s']:.1f}x" if base else "1.0x (baseline)"
    return [
        name,
        str(r["requests"]),
        str(r["dropped"]),
        f"{r['requests_per_s']:.2f}",
        f"{r['chars_per_s']:,.0f}",
        ratio,
        f"{r['first_char_median_ms']:.0f}",
        f"{r['first_char_p95_ms']:.0f}",
        f"{r.get('after_100_mb', float('nan')):.0f} -> {r['end_mb']:.0f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--single", type=int, default=30, help="samples for the one-client baseline")
    parser.add_argument("--length", type=int, default=500)
    parser.add_argument("--seed", default="ROMEO.\n")
    parser.add_argument("--no-busy", action="store_true", help="skip the run beside a CPU-bound neighbour")
    parser.add_argument("--name", help="results file name [default: serve-<date>]")
    args = parser.parse_args()
    began = time.monotonic()
    proc, url = start_server(args.checkpoint.resolve(), max_generations=max(32, args.clients))
    results: dict = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "checkpoint": str(args.checkpoint),
        "length": args.length,
        "runs": {},
    }
    try:
        model = httpx.get(url + "api/models", timeout=60).json()["models"][0]
        results["model"] = model
        asyncio.run(load(url, 1, 3, args.length, proc.pid, args.seed))  # load the model, warm the caches
        runs = results["runs"]
        runs["1 client"] = asyncio.run(load(url, 1, args.single, args.length, proc.pid, args.seed))
        runs[f"{args.clients} clients"] = asyncio.run(
            load(url, args.clients, args.requests, args.length, proc.pid, args.seed)
        )
        if not args.no_busy and time.monotonic() - began < DEADLINE_S / 2:
            with matmul_neighbour(DEADLINE_S):
                runs["1 client, busy"] = asyncio.run(load(url, 1, args.single, args.length, proc.pid, args.seed))
                runs[f"{args.clients} clients, busy"] = asyncio.run(
                    load(url, args.clients, max(100, args.requests // 4), args.length, proc.pid, args.seed)
                )
    finally:
        kill_group(proc)
    base = results["runs"]["1 client"]
    busy_base = results["runs"].get("1 client, busy")
    rows = [
        [
            "run",
            "requests",
            "dropped",
            "req/s",
            "chars/s",
            "vs 1 client",
            "first char ms (median)",
            "p95",
            "server MB (after 100 -> end)",
        ]
    ]
    for name, r in results["runs"].items():
        rows.append(row(name, r, None if name.startswith("1 client") else busy_base if "busy" in name else base))
    m = model
    title = (
        f"charlm serve on loopback, {m['cell']} {m['layers']}x{m['hidden']} ({m['params']:,} parameters), "
        f"{args.length}-character samples, on {results['machine'].get('cpu', '?')}"
    )
    finish(title, rows, results, args.name or f"serve-{dt.date.today()}")


if __name__ == "__main__":
    main()
