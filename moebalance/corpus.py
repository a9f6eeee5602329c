"""Byte-level text corpora for training and evaluating the small MoE (``scripts/train_tiny.py``).

Framework-agnostic (torch only). A corpus is a set of named domains, each a list of documents
(bytes). The default corpus is text every Python installation carries, so nothing is downloaded:

- ``prose``: the English topic texts of Python's documentation (``pydoc_data.topics``), sorted
  by topic name, each cut into ~2 KiB blocks of paragraphs (one document per block);
- ``code``: the standard library's own sources, one document per ``.py`` file directly under
  ``sysconfig.get_paths()["stdlib"]`` (sorted; sub-packages left out to keep it small).

``load_corpus_dir(DIR)`` reads any folder of text files instead, one domain per file (name = the
file's stem), split into documents at blank lines grouped into ~4 KiB blocks.

Split rule (fixed, no randomness): document i of a domain is held out when i % 10 == 9.
Tokenizer: bytes (vocabulary 256), so a token id is a byte value.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "VOCAB_SIZE",
    "DEFAULT_DOMAINS",
    "HELD_OUT_EVERY",
    "Corpus",
    "default_corpus",
    "load_corpus_dir",
    "encode",
    "decode",
    "heldout_sequences",
    "sample_batch",
]

VOCAB_SIZE = 256
DEFAULT_DOMAINS = ("code", "prose")  # the domains of ``default_corpus``
HELD_OUT_EVERY = 10  # document i is held out when i % 10 == 9
_DIR_BLOCK_BYTES = 4096


@dataclass(frozen=True)
class Corpus:
    """name: a label ("default" or the folder); train / heldout: {domain: 1-D uint8 tensor}
    (the domain's documents joined with a newline); documents: {domain: (train, held out)}."""

    name: str
    train: dict[str, torch.Tensor]
    heldout: dict[str, torch.Tensor]
    documents: dict[str, tuple[int, int]]

    @property
    def domains(self) -> list[str]:
        return sorted(self.train)


def encode(text: str | bytes) -> torch.Tensor:
    """UTF-8 bytes as a 1-D uint8 tensor (byte-level tokens)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def decode(ids: torch.Tensor) -> str:
    return bytes(ids.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def _split(name: str, docs: dict[str, list[bytes]]) -> Corpus:
    train, heldout, counts = {}, {}, {}
    for domain, items in sorted(docs.items()):
        tr = [d for i, d in enumerate(items) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
        ho = [d for i, d in enumerate(items) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
        if not tr or not ho:
            raise ValueError(
                f"corpus {name}: domain {domain!r} has {len(items)} document(s); at least "
                f"{HELD_OUT_EVERY} are needed for the train / held-out split"
            )
        train[domain] = encode(b"\n".join(tr))
        heldout[domain] = encode(b"\n".join(ho))
        counts[domain] = (len(tr), len(ho))
    return Corpus(name=name, train=train, heldout=heldout, documents=counts)


def _blocks(text: bytes, size: int = _DIR_BLOCK_BYTES) -> list[bytes]:
    """Blank-line separated paragraphs of ``text`` packed into blocks of about ``size`` bytes."""
    blocks, current = [], b""
    for para in text.split(b"\n\n"):
        current = current + b"\n\n" + para if current else para
        if len(current) >= size:
            blocks.append(current)
            current = b""
    if current:
        blocks.append(current)
    return blocks


def default_corpus(max_code_files: int | None = None) -> Corpus:
    """Python's own documentation topics (prose; each topic cut into ~2 KiB blocks of
    paragraphs, so the held-out part is not a handful of topics) and standard library sources
    (code; one document per file)."""
    from pydoc_data.topics import topics

    prose = [b for key in sorted(topics) for b in _blocks(topics[key].encode("utf-8"), 2048)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    if max_code_files is not None:
        files = files[:max_code_files]
    code = [p.read_bytes() for p in files]
    return _split("default", {"prose": prose, "code": code})


def load_corpus_dir(path: str | Path) -> Corpus:
    """One domain per text file in ``path`` (sorted; name = file stem), documents = blank-line
    separated paragraphs packed into ~4 KiB blocks."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"corpus {root} is not a directory")
    docs: dict[str, list[bytes]] = {}
    for file in sorted(p for p in root.iterdir() if p.is_file()):
        docs[file.stem] = _blocks(file.read_bytes())
    if not docs:
        raise ValueError(f"corpus {root} holds no files")
    return _split(root.name, docs)


def heldout_sequences(corpus: Corpus, domain: str, count: int, seq_len: int) -> torch.Tensor:
    """[count, seq_len + 1] int64: evenly spaced, non-overlapping where the text allows, windows
    of the domain's held-out text (deterministic). Input = [:, :-1], target = [:, 1:]."""
    text = corpus.heldout[domain]
    span = seq_len + 1
    if text.numel() < span:
        raise ValueError(f"held-out {domain!r} text ({text.numel()} bytes) < {span}")
    starts = torch.linspace(0, text.numel() - span, count).long()
    return torch.stack([text[s : s + span] for s in starts.tolist()]).long()


def sample_batch(
    corpus: Corpus, batch: int, seq_len: int, gen: torch.Generator
) -> torch.Tensor:
    """[batch, seq_len + 1] int64 random training windows, domains taking turns (row b comes
    from domain b % D), start offsets drawn from ``gen``."""
    domains = corpus.domains
    rows = []
    for b in range(batch):
        text = corpus.train[domains[b % len(domains)]]
        start = int(torch.randint(0, text.numel() - seq_len - 1, (1,), generator=gen))
        rows.append(text[start : start + seq_len + 1])
    return torch.stack(rows).long()
