"""CharLM: a trained model ready to use, the facade that `sample` and `perplexity` share.

Each call runs under `device.cpu_settings(threads)` (flush denormals, the thread count asked for)
and gives the caller's settings back when it ends: loading a model changes nothing process-wide.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from . import checkpoint as ckpt
from .data import corpus_from_text, load_corpus, read_text
from .device import ThreadTuner, cpu_settings, resolve_device, resolve_precision, resolve_weight_format
from .evaluate import Metrics, evaluate
from .model import CharRNN
from .sample import Sampler
from .surprise import TextScore, score_text
from .vocab import Unknown, Vocab


class CharLM:
    """A model with its vocab and the checkpoint header it came from."""

    def __init__(
        self,
        model: CharRNN,
        vocab: Vocab,
        *,
        header: ckpt.Header | None = None,
        precision: str = "fp32",
        sample_precision: str = "auto",
        threads: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.vocab = vocab
        self.header = header
        self.device = next(model.parameters()).device
        self.precision = precision  # the autocast dtype of scoring
        self.weight_format = resolve_weight_format(sample_precision, self.device)  # the weights sampling reads
        self.threads = threads  # None: each call adapts the CPU thread count to the load (ThreadTuner)
        self._sampler = Sampler(self.model, vocab, weight_format=self.weight_format, threads=threads)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        device: str = "auto",
        precision: str = "auto",
        sample_precision: str = "auto",
        threads: int | None = None,
    ) -> CharLM:
        """Loads a checkpoint (default: the newest in ./checkpoints) onto `device`, whatever device
        it was trained on. precision 'auto' scores with the autocast dtype the model was trained with;
        sample_precision (`sample --precision`) 'auto' generates with the fastest weight format the
        device offers (see device.resolve_weight_format)."""
        with cpu_settings(threads):  # the sampler prepares its weights here, under the same arithmetic
            header = ckpt.read_header(path if path is not None else ckpt.newest_checkpoint())
            model = ckpt.build_model(header)
            dev = resolve_device(device)
            if precision == "auto":  # score as training validated, so `perplexity` reproduces train's figure
                precision = str(header.train.get("precision", "auto"))
            return cls(
                model.to(dev),
                header.vocab,
                header=header,
                precision=resolve_precision(precision, dev),
                sample_precision=sample_precision,
                threads=threads,
            )

    @property
    def path(self) -> Path | None:
        return self.header.path if self.header else None

    def stream_batch(
        self,
        seed: str = "",
        *,
        length: int = 500,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        num_samples: int = 1,
        rng_seed: int | None = None,
    ) -> Iterator[list[str]]:
        """Per generated position, one new character for each of `num_samples` samples. The CPU
        settings hold while the generator runs, and are given back when it finishes or is closed."""
        with cpu_settings(self.threads):
            yield from self._sampler.stream(
                seed,
                length=length,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                num_samples=num_samples,
                rng_seed=rng_seed,
            )

    def stream(
        self,
        seed: str = "",
        *,
        length: int = 500,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        rng_seed: int | None = None,
    ) -> Iterator[str]:
        """The generated characters one at a time, as they are produced (the seed is not repeated)."""
        for chars in self.stream_batch(
            seed, length=length, temperature=temperature, top_k=top_k, top_p=top_p, rng_seed=rng_seed
        ):
            yield chars[0]

    def sample(
        self,
        seed: str = "",
        *,
        length: int = 500,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        rng_seed: int | None = None,
    ) -> str:
        """The seed followed by `length` generated characters."""
        return seed + "".join(
            self.stream(seed, length=length, temperature=temperature, top_k=top_k, top_p=top_p, rng_seed=rng_seed)
        )

    def sample_many(
        self,
        seed: str = "",
        *,
        num_samples: int,
        length: int = 500,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        rng_seed: int | None = None,
    ) -> list[str]:
        """`num_samples` continuations generated together as one batch."""
        columns = list(
            self.stream_batch(
                seed,
                length=length,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                num_samples=num_samples,
                rng_seed=rng_seed,
            )
        )
        return [seed + "".join(col[i] for col in columns) for i in range(num_samples)]

    def perplexity(
        self, source: str | os.PathLike[str], *, batch_size: int = 64, unknown: Unknown = "skip", adapt: bool = False
    ) -> Metrics:
        """Scores a text (a str) or a file (a pathlib.Path or other path object) exactly.

        Unknown characters are dropped and counted with unknown='skip', refused with 'error'.
        `adapt`: dynamic evaluation, the model learning from the text as it scores it (a copy of it:
        this model is unchanged); lower figures on text with recurring names and phrases.
        """
        if isinstance(source, str):
            corpus = corpus_from_text(source, vocab=self.vocab, unknown=unknown)
        else:
            corpus = load_corpus(source, vocab=self.vocab, unknown=unknown)
        with cpu_settings(self.threads), ThreadTuner(self.device, self.threads) as tuner:
            return evaluate(
                self.model,
                corpus.ids,
                start_id=self.vocab.start_id,
                batch_size=batch_size,
                device=self.device,
                precision=self.precision,
                unknown=corpus.unknown,
                unknown_chars=corpus.unknown_chars,
                fold=self.vocab.fold_penalty,
                tuner=tuner,
                adapt=adapt,
            )

    def score(self, source: str | os.PathLike[str], *, batch_size: int = 64, adapt: bool = False) -> TextScore:
        """Where a text (a str) or a file (a path object) surprises the model: the bits each character
        cost, the model's top guesses there, per-line figures (`.lines`, `.most_surprising(n)`) and
        the whole text's `.metrics`. The same exact streamed scoring as `perplexity`; unknown
        characters stay in the text, unscored. Holds the whole text in memory, unlike `perplexity`.
        `adapt` as for `perplexity`."""
        text = source if isinstance(source, str) else read_text(source)
        with cpu_settings(self.threads), ThreadTuner(self.device, self.threads) as tuner:
            return score_text(
                self.model,
                self.vocab,
                text,
                batch_size=batch_size,
                device=self.device,
                precision=self.precision,
                tuner=tuner,
                adapt=adapt,
            )

    def __repr__(self) -> str:
        c = self.model.config
        return f"CharLM({c.cell} {c.num_layers}x{c.hidden_size}, vocab {len(self.vocab)}, from {self.path})"
