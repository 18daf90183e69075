"""The playground page in a real headless browser (Debian's chromium, driven by Playwright): pick a
model, write two samples side by side and watch them stream in, score a text full of markup and see
the heat map show it as text, look at a run's curves. Screenshots go to $CHARLM_ARTIFACTS (default
test-artifacts/). Without chromium the test is skipped, unless CHARLM_REQUIRE_BROWSER=1 (as in CI)."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

pytest.importorskip("starlette")
sync_api = pytest.importorskip("playwright.sync_api")

from test_serve import served, start_server  # noqa: E402, F401 - the fixture is used by name

from charlm import CharLM  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    if os.environ.get("CHARLM_REQUIRE_BROWSER") == "1":
        raise RuntimeError("CHARLM_REQUIRE_BROWSER=1 but there is no chromium on PATH (apt-get install chromium)")
    pytest.skip("no chromium on PATH (apt-get install chromium)", allow_module_level=True)

ARTIFACTS = Path(os.environ.get("CHARLM_ARTIFACTS", "test-artifacts"))
HOSTILE = 'Right <img src=x onerror="window.pwned=1"> and <script>window.pwned=2</script> the end.\nThe day.\n'


def test_the_playground_writes_scores_and_draws_curves_in_a_real_browser(served: Path) -> None:  # noqa: F811
    proc, url = start_server([], served.parent)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.goto(url)

            # the models, newest first, and the one chosen described
            # (waits use locators: the page's policy forbids the eval that wait_for_function needs)
            sync_api.expect(page.locator("#model option")).to_have_count(2)
            assert page.locator("#model option").all_inner_texts() == ["words", "older"]
            page.select_option("#model", "words")
            assert "LSTM 2x48" in page.inner_text("#model-info")

            # write: two samples side by side, streamed in pieces, each the text of its rng seed
            page.fill("#seed", "The ")
            page.fill("#length", "2000")
            page.fill("#rng-seed", "3")
            page.fill("#samples", "2")
            # every length the samples showed on the way: text that streams shows lengths between
            # none and all (counting DOM changes instead depends on how fast this machine writes)
            page.evaluate(
                """() => { window.seen = new Set(); new MutationObserver(() => {
                     for (const g of document.querySelectorAll('#outputs .generated'))
                       window.seen.add(g.textContent.length); })
                   .observe(document.getElementById('outputs'),
                            {subtree: true, characterData: true, childList: true}); }"""
            )
            page.click("#write-button")
            sync_api.expect(page.locator(".sample .stats")).to_contain_text(["chars/s", "chars/s"], timeout=30_000)
            texts = page.locator(".sample .generated").all_text_contents()
            lm = CharLM.load(served / "words.safetensors", device="cpu")
            assert texts == [lm.sample("The ", length=2000, rng_seed=s)[4:] for s in (3, 4)]
            partial = page.evaluate("[...window.seen].filter(n => n > 0 && n < 2000).length")
            assert partial >= 1  # the text arrived in pieces, not all at the end
            page.screenshot(path=str(ARTIFACTS / "playground-write.png"), full_page=True)

            # a stop string typed with \n for a newline ends the sample where `sample --stop` does
            page.fill("#samples", "1")
            page.fill("#stop-at", "\\n")
            page.click("#write-button")
            sync_api.expect(page.locator(".sample .stats")).to_contain_text([", stop"], timeout=30_000)
            expected = lm.sample("The ", length=400, rng_seed=3, stop=["\n"])[4:]
            assert page.locator(".sample .generated").all_text_contents() == [expected]

            # score: markup in the text is shown as text, never run
            page.click(".tab[data-tab=score]")
            page.fill("#score-text", HOSTILE)
            page.click("#score-button")
            page.wait_for_selector("#figures th")
            figures = page.inner_text("#figures")
            assert "bits/char" in figures and "perplexity" in figures
            assert page.locator("#heatmap span").count() == len(HOSTILE)
            assert "<script>window.pwned=2</script>" in page.inner_text("#heatmap")
            assert page.evaluate("document.querySelectorAll('#heatmap img, #heatmap script').length") == 0
            assert page.evaluate("window.pwned") is None
            page.hover("#heatmap span >> nth=1")
            tip = page.inner_text("#tip")
            assert "bits" in tip and "%" in tip
            page.screenshot(path=str(ARTIFACTS / "playground-score.png"), full_page=True)

            # runs: the learning curves of the run beside the checkpoint
            page.click(".tab[data-tab=runs]")
            page.wait_for_selector("#curve polyline.val")
            assert "best validation" in page.inner_text("#run-info")
            page.screenshot(path=str(ARTIFACTS / "playground-runs.png"), full_page=True)
            browser.close()
        assert problems == []
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
