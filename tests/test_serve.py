"""`charlm serve`: every endpoint and every limit driven in-process, the batch that concurrent
generations share, and the command itself started, used and stopped with Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx2")

from conftest import run_cli  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from charlm import CharLM  # noqa: E402
from charlm.serve.app import Limits, create_app  # noqa: E402
from charlm.serve.models import Models  # noqa: E402
from charlm.serve.pool import GenerationPool, Request  # noqa: E402

LOCAL = "http://127.0.0.1"


@pytest.fixture
def served(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A checkpoints folder with two models (`older`, `words`) and the run log of `words`."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copy(tiny_checkpoint, folder / "older.safetensors")
    os.utime(folder / "older.safetensors", (1_000_000_000, 1_000_000_000))
    shutil.copy(tiny_checkpoint, folder / "words.safetensors")
    shutil.copy(tiny_checkpoint.with_name("words.metrics.jsonl"), folder / "words.metrics.jsonl")
    return folder


def client_for(folder: Path, **limits: object) -> TestClient:
    models = Models([folder], device="cpu")
    return TestClient(create_app(models, Limits(**limits), loopback_only=True), base_url=LOCAL)


def events(response) -> list[tuple[str, dict]]:  # noqa: ANN001
    return events_of(response.iter_lines())


def events_of(lines: Iterator[str]) -> list[tuple[str, dict]]:
    out, kind = [], None
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            out.append((kind, json.loads(line[6:])))
    return out


def generated(evs: list[tuple[str, dict]]) -> str:
    return "".join(d["text"] for k, d in evs if k == "chars")


def test_models_are_listed_by_name_newest_first_with_their_figures(served: Path) -> None:
    with client_for(served) as client:
        models = client.get("/api/models").json()["models"]
    assert [m["name"] for m in models] == ["words", "older"]
    m = models[0]
    assert (m["cell"], m["layers"], m["hidden"]) == ("lstm", 2, 48)
    assert m["corpus"] == "words" and m["corpus_chars"] > 50_000
    assert 0 < m["val_bpc"] < 5 and m["params"] > 10_000


def test_a_sample_streams_and_the_same_rng_seed_gives_the_text_of_charlm_sample(
    served: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = {"model": "words", "seed": "The ", "length": 120, "temperature": 0.9, "rng_seed": 7}
    with client_for(served) as client, client.stream("POST", "/api/sample", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        evs = events(response)
    kinds = [k for k, _ in evs]
    assert kinds[0] == "start" and kinds[-1] == "done" and "chars" in kinds
    assert evs[0][1] == {"model": "words", "seed": "The ", "length": 120, "rng_seed": 7}
    done = evs[-1][1]
    assert done["chars"] == 120 and done["stopped"] == "length" and done["first_char_s"] >= 0
    code, out, _ = run_cli(
        [
            "sample",
            "-c",
            str(served / "words.safetensors"),
            "--seed",
            "The ",
            "-n",
            "120",
            "-t",
            "0.9",
            "--rng-seed",
            "7",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0 and out == "The " + generated(evs) + "\n"


def test_concurrent_generations_share_one_batch_and_each_writes_what_it_writes_alone(tiny_checkpoint: Path) -> None:
    lm = CharLM.load(tiny_checkpoint, device="cpu")
    requests = [
        Request(seed="The ", length=150, temperature=1.0, rng_seed=1),
        Request(seed="", length=90, temperature=0.7, top_k=5, rng_seed=2),
        Request(seed="and", length=200, temperature=1.2, top_p=0.9, rng_seed=3),
        Request(seed="It was", length=60, temperature=0.0),
    ]
    pool = GenerationPool(lm)
    sizes: list[int] = []
    step = lm.sampler.step
    original = type(step).__call__

    def counting(self, ids):  # noqa: ANN001, ANN202
        sizes.append(len(ids))
        return original(self, ids)

    async def run_all() -> list[str]:
        async def one(r: Request) -> str:
            g = pool.start(r)
            text = []
            while True:
                e = await g.queue.get()
                if e.kind == "chars":
                    text.append(e.text)
                else:
                    assert e.kind == "done" and e.summary["stopped"] == "length"
                    return "".join(text)

        return await asyncio.gather(*(one(r) for r in requests))

    try:
        type(step).__call__ = counting
        texts = asyncio.run(run_all())
    finally:
        type(step).__call__ = original
        pool.close()
    assert max(sizes) >= 3  # they ran side by side, not one after another
    for r, text in zip(requests, texts, strict=True):
        alone = lm.sample(
            r.seed, length=r.length, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, rng_seed=r.rng_seed
        )
        assert r.seed + text == alone


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"length": 5000}, 400, "length 5,000 is over the server's limit of 2,000 (--max-length)"),
        ({"length": 0}, 400, "length must be at least 1 (got 0)"),
        ({"temperature": -1}, 400, "temperature must be 0 (greedy) or more (got -1.0)"),
        ({"top_p": 2}, 400, "top_p must be in (0, 1] (got 2.0)"),
        ({"length": "long"}, 400, "'length' must be an integer"),
        ({"seed": "zq"}, 400, "the seed has 2 characters the model never saw: 'q', 'z'"),
        ({"colour": "red"}, 400, "unknown field 'colour'"),
        ({"stop": [""]}, 400, "stop must be a non-empty string"),
        ({"stop": {"a": 1}}, 400, "'stop' must be a string"),
        ({"lines": 0}, 400, "lines must be at least 1 (got 0)"),
        ({"include_stop": "yes"}, 400, "'include_stop' must be true or false"),
        ({"model": "../../etc/passwd"}, 404, "no model named '../../etc/passwd': GET /api/models lists the models"),
        ({"model": ["words"]}, 404, "'model' must be a model name from GET /api/models"),
    ],
)
def test_bad_sample_requests_get_a_4xx_that_says_what_is_wrong(
    served: Path, body: dict, status: int, message: str
) -> None:
    with client_for(served) as client:
        response = client.post("/api/sample", json={"model": "words", **body})
    assert response.status_code == status
    assert message in response.json()["error"]


def test_a_served_sample_stops_where_charlm_sample_stops(served: Path, tiny_checkpoint: Path) -> None:
    lm = CharLM.load(tiny_checkpoint, device="cpu")
    with client_for(served) as client:
        runs = {
            (tuple(stop), lines, keep): events(
                client.post(
                    "/api/sample",
                    json={
                        "seed": "The ",
                        "length": 400,
                        "rng_seed": 5,
                        "stop": stop,
                        "lines": lines,
                        "include_stop": keep,
                    },
                )
            )
            for stop, lines, keep in [([". "], None, False), ([". ", "zzz"], None, True), ([], 2, False)]
        }
    for (stop, lines, keep), evs in runs.items():
        expected = lm.sample("The ", length=400, rng_seed=5, stop=list(stop), lines=lines, include_stop=keep)[4:]
        done = evs[-1][1]
        assert generated(evs) == expected and done["chars"] == len(expected)
        assert done["stopped"] == ("lines" if lines else "stop") and len(expected) < 400


def test_bodies_must_be_small_json_objects(served: Path) -> None:
    with client_for(served, max_body=1000) as client:
        big = client.post("/api/score", json={"model": "words", "text": "a" * 2000})
        form = client.post("/api/sample", content=b"seed=The", headers={"content-type": "text/plain"})
        broken = client.post("/api/sample", content=b"{not json", headers={"content-type": "application/json"})
        array = client.post("/api/sample", json=[1, 2])
    assert big.status_code == 413
    assert big.json()["error"] == "the request body is over the server's limit of 1,000 bytes (--max-body)"
    assert form.status_code == 415 and "Content-Type: application/json" in form.json()["error"]
    assert (broken.status_code, broken.json()["error"]) == (400, "the body is not valid JSON")
    assert (array.status_code, array.json()["error"]) == (400, "the body must be a JSON object")


def test_score_gives_the_figures_and_each_characters_bits_as_perplexity_does(
    served: Path, tiny_checkpoint: Path
) -> None:
    text = "The time was right.\nIt is a <script>alert(1)</script> day, Qx.\n"
    with client_for(served, max_score_chars=200) as client:
        data = client.post("/api/score", json={"model": "words", "text": text}).json()
        too_long = client.post("/api/score", json={"model": "words", "text": "a" * 201})
        empty = client.post("/api/score", json={"model": "words", "text": ""})
    lm = CharLM.load(tiny_checkpoint, device="cpu")
    expected = lm.perplexity(text)
    assert data["text"] == text  # returned as data, never marked up
    assert (data["chars"], data["unknown"], data["unknown_chars"]) == (
        expected.chars,
        expected.unknown,
        expected.unknown_chars,
    )
    assert {"Q", "x", "<"} <= set(data["unknown_chars"])  # the tiny model read only words
    assert data["bpc"] == pytest.approx(expected.bpc, rel=1e-6)
    assert len(data["bits"]) == len(data["guesses"]) == len(text)
    assert data["bits"][text.index("Q")] is None and data["guesses"][text.index("Q")] == []
    scored = [b for b in data["bits"] if b is not None]
    assert sum(scored) / len(scored) == pytest.approx(expected.bpc, abs=2e-3)
    assert all(
        len(g) == 3 and g[0][1] >= g[1][1] >= g[2][1] for g, b in zip(data["guesses"], data["bits"], strict=True) if b
    )
    assert too_long.status_code == 413
    assert too_long.json()["error"] == "the text has 201 characters, over the server's limit of 200 (--max-score-chars)"
    assert empty.status_code == 400


def test_runs_give_the_learning_curves_and_only_by_name(served: Path) -> None:
    with client_for(served) as client:
        runs = client.get("/api/runs").json()["runs"]
        curves = client.get("/api/runs/words/metrics").json()
        missing = client.get("/api/runs/nope/metrics")
        sneaky = client.get("/api/runs/..%2F..%2Fwords/metrics")
    assert [r["name"] for r in runs] == ["words"]
    assert curves["val_bpc"] and curves["train_bpc"]
    assert curves["best_val_bpc"] == min(v for _, v in curves["val_bpc"])
    assert missing.status_code == 404 and "no run named 'nope'" in missing.json()["error"]
    assert sneaky.status_code == 404


def test_a_new_checkpoint_appears_without_a_restart_and_unreadable_files_are_skipped(served: Path) -> None:
    with client_for(served) as client:
        (served / "broken.safetensors").write_bytes(b"not a checkpoint")
        shutil.copy(served / "words.safetensors", served / "fresh.safetensors")
        names = [m["name"] for m in client.get("/api/models").json()["models"]]
    assert names[0] == "fresh" and "broken" not in names


def test_the_page_and_its_assets_come_with_a_strict_policy(served: Path) -> None:
    with client_for(served) as client:
        page = client.get("/")
        script = client.get("/playground.js")
        foreign = client.get("/", headers={"host": "evil.example"})
        nothing = client.get("/api/nothing")
    assert page.status_code == 200 and "charlm" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in page.text  # no inline script: the policy forbids it
    assert script.headers["content-type"].startswith("text/javascript") and "innerHTML" not in script.text
    assert foreign.status_code == 400  # a loopback server answers only to loopback names (DNS rebinding)
    assert nothing.status_code == 404 and nothing.json() == {"error": "no such page"}


@contextlib.contextmanager
def live_server(folder: Path, **limits: object) -> Iterator[tuple[str, Models]]:
    """The app on a real socket (uvicorn in a thread): streaming and disconnects as a browser sees them."""
    import uvicorn

    from charlm.serve.run import bind, url_of

    models = Models([folder], device="cpu")
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(
        uvicorn.Config(create_app(models, Limits(**limits), loopback_only=True), log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield url_of(sock), models
    finally:
        server.should_exit = True
        thread.join(10)
        models.close()
        sock.close()


@pytest.fixture
def slow_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """2 ms per generation step, so a long generation is still running when the test acts."""
    from charlm.sample import FixedStep, StepModel

    for kind in (StepModel, FixedStep):
        original = kind.__call__

        def slow(self, ids, original=original):  # noqa: ANN001, ANN202
            time.sleep(0.002)
            return original(self, ids)

        monkeypatch.setattr(kind, "__call__", slow)


def test_too_many_generations_get_429_and_a_timeout_ends_a_generation(served: Path, slow_steps: None) -> None:
    import httpx2 as httpx

    with live_server(served, max_generations=1, timeout_s=0.5) as (url, _), httpx.Client(timeout=30) as client:
        with client.stream("POST", url + "api/sample", json={"length": 2000}) as first:
            lines = first.iter_lines()
            assert next(lines) == "event: start"
            second = client.post(url + "api/sample", json={"length": 10})
            evs = events_of(lines)
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert "all 1 generation slots are in use" in second.json()["error"]
        done = evs[-1][1]
        assert evs[-1][0] == "done" and done["stopped"] == "timeout" and 0 < done["chars"] < 2000
        assert len(generated(evs)) == done["chars"]
        after = client.post(url + "api/sample", json={"length": 5})  # the slot is free again
        assert after.status_code == 200


def test_a_client_that_disconnects_stops_its_generation(served: Path, slow_steps: None) -> None:
    import httpx2 as httpx

    with live_server(served) as (url, models), httpx.Client(timeout=30) as client:
        with client.stream("POST", url + "api/sample", json={"length": 2000}) as response:
            lines = response.iter_lines()
            while next(lines) != "event: chars":
                pass
        _, _, pool = models.get("words")
        deadline = time.monotonic() + 5
        while pool.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.active == 0  # well before 2,000 steps of 2 ms
        assert client.post(url + "api/sample", json={"length": 5}).status_code == 200


def test_a_failing_generation_ends_alone_and_the_server_goes_on(served: Path, monkeypatch) -> None:  # noqa: ANN001
    from charlm.sample import Sampler

    original = Sampler.prime

    def prime(self, seed, num_samples):  # noqa: ANN001, ANN202
        if seed == "boom":
            raise RuntimeError("a bug in priming")
        return original(self, seed, num_samples)

    monkeypatch.setattr(Sampler, "prime", prime)
    with client_for(served) as client:
        with client.stream("POST", "/api/sample", json={"seed": "boom", "length": 50}) as response:
            evs = events(response)
        ok = client.post("/api/sample", json={"seed": "The", "length": 50})
    assert evs[-1] == ("error", {"error": "generation failed: RuntimeError: a bug in priming"})
    assert ok.status_code == 200 and "event: done" in ok.text


def test_serve_without_the_web_extra_says_how_to_get_it(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:  # noqa: ANN001
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    code, out, err = run_cli(["serve"], capsys)
    assert code == 2 and out == ""
    assert err == (
        "error: charlm serve needs uvicorn, which is not installed: "
        "install the web extra: pip install 'charlm[serve]'\n"
    )


def test_serve_refuses_a_missing_checkpoint_and_an_empty_folder(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["serve", "--checkpoint", "nope.safetensors", "--port", "0"], capsys)
    assert code == 2
    assert err == (
        "error: --checkpoint nope.safetensors: no such file or folder: give a checkpoint or a folder of them\n"
    )
    code, _, err = run_cli(["serve", "--port", "0"], capsys)
    assert code == 2
    assert err == (
        "error: no checkpoint to serve in checkpoints: train one first (charlm train FILE) or pass --checkpoint\n"
    )
    code, _, err = run_cli(["serve", "--max-length", "0"], capsys)
    assert (code, err) == (2, "error: --max-length must be at least 1 (got 0)\n")


def start_server(args: list[str], cwd: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "charlm", "serve", "--port", "0", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    url = proc.stdout.readline().strip()
    assert url.startswith("http://"), proc.stderr.read()
    return proc, url


def test_the_command_serves_until_ctrl_c_and_warns_when_open_to_the_network(served: Path) -> None:
    import httpx2 as httpx

    proc, url = start_server(["--host", "0.0.0.0"], served.parent)
    try:
        models = httpx.get(url + "api/models", timeout=30).json()["models"]
        assert [m["name"] for m in models] == ["words", "older"]
        with httpx.stream("POST", url + "api/sample", json={"seed": "The", "length": 30}, timeout=30) as r:
            assert "event: done" in r.read().decode()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "warning: listening on 0.0.0.0: anyone who can reach this machine" in err
    assert "Traceback" not in err
