"""The README's picture of the playground: a real model writing two samples and scoring a text.

    python bench/playground_shot.py --checkpoint checkpoints/shakespeare.safetensors

Starts `charlm serve` on a free loopback port, drives Debian's chromium with Playwright (as the
browser test does), writes two samples of "ROMEO:" with random seeds 1 and 2, scores a few lines,
and saves one picture of both tabs side by side to bench/results/serve-playground.png.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

HERE = Path(__file__).resolve().parent
SCORED = (
    "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n\n"
    "JULIET:\nThe WiFi password is on the fridge, next to the <script> tags.\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve-playground.png")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium on PATH (apt-get install chromium)")
    proc = subprocess.Popen(
        [sys.executable, "-m", "charlm", "serve", "--port", "0", "-q", "-c", str(args.checkpoint)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().strip()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 760})
            page.goto(url)
            expect(page.locator("#model option")).not_to_have_count(0)
            page.fill("#seed", "ROMEO:\n")
            page.fill("#length", "360")
            page.fill("#rng-seed", "1")
            page.fill("#samples", "2")
            page.click("#write-button")
            expect(page.locator(".sample .stats")).to_contain_text(["chars/s", "chars/s"], timeout=60_000)
            write = page.screenshot(clip={"x": 0, "y": 0, "width": 1400, "height": 560})
            page.click(".tab[data-tab=score]")
            page.fill("#score-text", SCORED)
            page.click("#score-button")
            page.wait_for_selector("#heatmap span")
            page.hover("#heatmap span >> nth=100")
            score = page.screenshot(clip={"x": 0, "y": 0, "width": 1400, "height": 760})
            # the two tabs one above the other, drawn by the browser itself (no imaging library)
            page.set_content(
                "<body style='margin:0;background:#111'>"
                + "".join(
                    f"<img style='display:block' src='data:image/png;base64,{_b64(png)}'>" for png in (write, score)
                )
                + "</body>"
            )
            page.set_viewport_size({"width": 1400, "height": 1320})
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


if __name__ == "__main__":
    main()
