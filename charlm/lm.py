"""CharLM: a trained model ready to use, the facade that `sample` and `perplexity` share.

Each call runs under `device.cpu_settings(threads)` (flush denormals, the thread count asked for)
and gives the caller's settings back when it ends: loading a model changes nothing process-wide.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from . import checkpoint as ckpt
from .adapt import Adaptation
from .data import corpus_from_text, iter_text, iter_text_stream, load_corpus, read_text
from .device import ThreadTuner, cpu_settings, resolve_device, resolve_precision, resolve_weight_format
from .errors import ConfigError
from .evaluate import Metrics, evaluate
from .model import CharRNN
from .sample import Sampler
from .surprise import TextScore, score_text
from .vocab import Unknown, Vocab


def _pieces(source: str | os.PathLike[str] | Iterable[str] | None) -> Iterable[str] | None:
    """A seed file's text in pieces: a file name or path is read in chunks (checked as corpora are),
    "-" is stdin, and any other iterable of strings is the text itself."""
    if source is None:
        return None
    if isinstance(source, str) and source == "-":
        return (text for _, text in iter_text_stream(sys.stdin.buffer, "stdin"))
    if isinstance(source, (str, os.PathLike)):
        return (text for _, text in iter_text(Path(source)))
    return source


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
    def sampler(self) -> Sampler:
        """The generation machinery (its StepModel holds the running state), shared with `charlm serve`."""
        return self._sampler

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
        stop: Sequence[str] = (),
        lines: int | None = None,
        include_stop: bool = False,
        seed_file: str | os.PathLike[str] | Iterable[str] | None = None,
        adapt: bool = False,
    ) -> Iterator[list[str]]:
        """Per generated position, the new text of each of `num_samples` samples (one character each
        unless `stop`/`lines` hold some back: see Sampler.stream). The CPU settings hold while the
        generator runs, and are given back when it finishes or is closed.

        `stop`: strings that end a sample (left out of it unless `include_stop`); `lines`: end each
        sample after that many newlines; `seed_file`: a text file (or pieces of text) the model reads
        before the seed, streamed, with characters it does not know skipped (`self.skipped` after);
        `adapt`: the model (a copy) learns from the seed file and seed as it reads them, with the
        steps `compress` takes, then writes with what it learnt (Sampler._adapting)."""
        with cpu_settings(self.threads):
            yield from self._sampler.stream(
                seed,
                length=length,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                num_samples=num_samples,
                rng_seed=rng_seed,
                stop=stop,
                lines=lines,
                include_stop=include_stop,
                before=_pieces(seed_file),
                adapt=Adaptation() if adapt else None,
            )

    @property
    def skipped(self) -> int:
        """Characters of the last seed file that the model could not read (not in its vocabulary)."""
        return getattr(self._sampler, "skipped", 0)

    def beam_search(
        self,
        seed: str = "",
        *,
        beam: int = 4,
        length: int = 500,
        stop: Sequence[str] = (),
        lines: int | None = None,
        include_stop: bool = False,
        seed_file: str | os.PathLike[str] | Iterable[str] | None = None,
    ) -> tuple[str, float]:
        """(the seed and the most likely continuation a beam of `beam` finds, the continuation's
        log-probability in nats); never less likely than greedy decoding (`beam=1`)."""
        with cpu_settings(self.threads):
            text, logp = self._sampler.beam_search(
                seed,
                beam=beam,
                length=length,
                stop=stop,
                lines=lines,
                include_stop=include_stop,
                before=_pieces(seed_file),
            )
        return seed + text, logp

    def stream(
        self,
        seed: str = "",
        *,
        length: int = 500,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        rng_seed: int | None = None,
        stop: Sequence[str] = (),
        lines: int | None = None,
        include_stop: bool = False,
        seed_file: str | os.PathLike[str] | Iterable[str] | None = None,
        adapt: bool = False,
    ) -> Iterator[str]:
        """The text as it is produced: the seed first, then a character (or, with `stop`, a few) at a
        time, so that joining what it yields gives what `sample` returns. Options as for `stream_batch`."""
        if seed:
            yield seed
        for pieces in self.stream_batch(
            seed,
            length=length,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            rng_seed=rng_seed,
            stop=stop,
            lines=lines,
            include_stop=include_stop,
            seed_file=seed_file,
            adapt=adapt,
        ):
            if pieces[0]:
                yield pieces[0]

    def sample(
        self,
        seed: str = "",
        *,
        length: int = 500,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        rng_seed: int | None = None,
        stop: Sequence[str] = (),
        lines: int | None = None,
        include_stop: bool = False,
        seed_file: str | os.PathLike[str] | Iterable[str] | None = None,
        adapt: bool = False,
        beam: int | None = None,
    ) -> str:
        """The seed followed by up to `length` generated characters (fewer where `stop` or `lines`
        ends it). `beam`: the most likely continuation instead of a random one (see beam_search;
        temperature, top-k, top-p and rng_seed do not apply)."""
        if beam is not None:
            if adapt:
                raise ConfigError("--adapt and --beam do not go together", "leave out one of them")
            text, _ = self.beam_search(
                seed, beam=beam, length=length, stop=stop, lines=lines, include_stop=include_stop, seed_file=seed_file
            )
            return text
        return "".join(
            self.stream(
                seed,
                length=length,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                rng_seed=rng_seed,
                stop=stop,
                lines=lines,
                include_stop=include_stop,
                seed_file=seed_file,
                adapt=adapt,
            )
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
        stop: Sequence[str] = (),
        lines: int | None = None,
        include_stop: bool = False,
        seed_file: str | os.PathLike[str] | Iterable[str] | None = None,
        adapt: bool = False,
    ) -> list[str]:
        """`num_samples` continuations generated together as one batch, each ending on its own."""
        columns = list(
            self.stream_batch(
                seed,
                length=length,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                num_samples=num_samples,
                rng_seed=rng_seed,
                stop=stop,
                lines=lines,
                include_stop=include_stop,
                seed_file=seed_file,
                adapt=adapt,
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
