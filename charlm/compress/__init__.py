"""Lossless text compression: the model's next-character probabilities drive a range coder.

A model that predicts text well is a compressor: coding a character that had probability p costs
-log2 p bits, so an archive holds about the model's cross-entropy in bits per character. The range
coder is `constriction`'s (pip install 'charlm[compress]'); this package supplies the probabilities,
the segments and the container, one job per module:

    container.py  the .clm bytes around the payload, and every number FORMAT_VERSION fixes
    coder.py      a model and its vocab <-> each segment's range-coded words (exact arithmetic)
    archive.py    text bytes <-> an archive in memory, checked, with reports of what it cost
    files.py      paths, stdin/stdout, atomic output, the checkpoint found by its sha256

The text is cut into segments as `charlm perplexity` cuts its streams (streams.py), with the
archive's own fixed parameters (ARCHIVE_CUTS), and the model advances all segments together one
character per step.

Two kinds of archive. The default (FLAG_PORTABLE, format 3) runs the model in integers
(charlm.fixed): any machine with the same checkpoint decodes it, whatever its CPU, instruction set,
thread count or torch. With `adapt` (FLAG_ADAPT) the float model keeps learning from the text as it
codes it: every ADAPT_STEPS characters encoder and decoder take the same SGD step on what they have
just coded, which makes the archive smaller (on held-out Shakespeare a 2.03 bits/char model codes at
1.85) but binds it to the same charlm and torch on the same kind of CPU (torch picks kernels by
instruction set, and their last bits differ); the archive records what decided its arithmetic, and a
decoder elsewhere names the difference instead of calling the file damaged.
"""

from .archive import CompressReport, DecompressReport, compress_bytes, decode_utf8, decompress_bytes
from .coder import ADAPT_STEPS, OnProgress, exact_arithmetic, known_ids, quantize
from .container import (
    ARCHIVE_CUTS,
    FLAG_ADAPT,
    FLAG_CRLF,
    FORMAT_VERSION,
    MAGIC,
    MIN_BITS_PER_CHAR,
    ArchiveHeader,
    read_archive_header,
    segment_bits,
)
from .files import (
    STDIO,
    SUFFIX,
    baseline_sizes,
    compress_file,
    decompress_file,
    file_sha256,
    load_model,
    output_path,
)

__all__ = [
    "ADAPT_STEPS",
    "ARCHIVE_CUTS",
    "FLAG_ADAPT",
    "FLAG_CRLF",
    "FORMAT_VERSION",
    "MAGIC",
    "MIN_BITS_PER_CHAR",
    "STDIO",
    "SUFFIX",
    "ArchiveHeader",
    "CompressReport",
    "DecompressReport",
    "OnProgress",
    "baseline_sizes",
    "compress_bytes",
    "compress_file",
    "decode_utf8",
    "decompress_bytes",
    "decompress_file",
    "exact_arithmetic",
    "file_sha256",
    "known_ids",
    "load_model",
    "output_path",
    "quantize",
    "read_archive_header",
    "segment_bits",
]
