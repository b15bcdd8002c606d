"""Labelled text data: IMDb (three on-disk layouts) and the embedded corpus, behind one small type.

Sources understood by `load_texts(source, split)`:

- `"embedded"`: the corpus the project writes itself (`textenv/corpus.py`); no files, no network.
- a directory of gzipped JSON Lines, `<split>.jsonl.gz` (or `.jsonl`), one `{"text": str, "label": 0|1}`
  per line, as in `../shared/data/imdb/`;
- the original `aclImdb/` layout: `<dir>/{train,test}/{pos,neg}/*.txt` and `<dir>/train/unsup/*.txt`
  (`<dir>` may be `aclImdb/` itself or the folder that holds it);
- `"hf:<name>"`, e.g. `"hf:imdb"`: HF `datasets` (needs the package and a network or a warm HF cache).

IMDb files are ordered negative-then-positive, so every loader shuffles with a seed (`seed=None` keeps
the file order). `<br />` tags are replaced by a space.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from pathlib import Path

from textenv.build.corpus import corpus_fingerprint, corpus_split
from textenv.build.texts import Texts

SPLITS = ("train", "test", "unsup")
_BR = re.compile(r"(?:\s*<br\s*/?>\s*)+", re.IGNORECASE)


class DataError(ValueError):
    """Bad or missing data; the message names the file and how to fix it."""

    user_error = True  # the CLIs print the message alone (no traceback): the user's data, not a bug


class CacheError(ValueError):
    """The artefact cache cannot be written (a read-only folder, a path under a file, a full disk)."""

    user_error = True


def writable_cache(folder: Path) -> Path:
    """`folder` created if need be and checked writable by writing a probe file, or a CacheError naming it.
    Called only before something is built: a complete, read-only cache is still reused."""
    probe = folder / ".write-check"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CacheError(f"cannot write the artefact cache {folder} ({e.strerror or e}); point --out-dir "
                         "(agents.rlhf: --artifacts-dir) at a folder you can write to, or free disk space") from None
    return folder


class MissingDataError(DataError, FileNotFoundError):
    """The data directory or split file does not exist."""


def clean(text: str) -> str:
    """Replace IMDb's `<br />` tags with a space and trim."""
    return _BR.sub(" ", text).strip()


def _check(texts: Texts, where: str, split: str) -> Texts:
    if len(texts) == 0:
        raise DataError(f"split '{split}' in {where} is empty; point the data source at a copy that has "
                        f"'{split}' records, or pick another split from {SPLITS}")
    if texts.labels is not None:
        bad = sorted({y for y in texts.labels if y not in (0, 1)}, key=repr)
        if bad:
            raise DataError(f"labels in split '{split}' of {where} must be 0 (negative) or 1 (positive), got "
                            f"{bad[:5]}; map the labels to 0/1 before loading")
    return texts


def _read_jsonl(path: Path) -> Texts:
    opener = gzip.open if path.suffix == ".gz" else open
    texts: list[str] = []
    labels: list[int] = []
    has_labels: bool | None = None
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    text = rec["text"]
                    if not isinstance(text, str):
                        raise TypeError(f"'text' is {type(text).__name__}, not str")
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f"{path}:{lineno}: unreadable record ({type(e).__name__}: {e}); each line must be "
                                    'a JSON object like {"text": "...", "label": 0}; fix or delete that line') from e
                if has_labels is None:
                    has_labels = "label" in rec
                if has_labels:
                    if "label" not in rec:
                        raise DataError(f"{path}:{lineno}: record has no 'label' while earlier ones do; "
                                        "give every record of a labelled split a 0/1 label")
                    labels.append(rec["label"])
                texts.append(clean(text))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e}); the file must be UTF-8 JSON Lines, "
                        "gzip-compressed when it ends in .gz; re-create it") from e
    return Texts(texts, labels if has_labels else None)


def _acl_root(d: Path) -> Path | None:
    for cand in (d, d / "aclImdb"):
        if (cand / "train" / "pos").is_dir() or (cand / "test" / "pos").is_dir():
            return cand
    return None


def _read_acl(root: Path, split: str) -> Texts:
    if split == "unsup":
        files = sorted((root / "train" / "unsup").glob("*.txt"), key=lambda p: p.name)
        return Texts([clean(p.read_text(encoding="utf-8")) for p in files], None)
    texts: list[str] = []
    labels: list[int] = []
    for lab, sub in ((0, "neg"), (1, "pos")):
        # numeric id order, as the JSONL copy: "<id>_<rating>.txt"
        files = sorted((root / split / sub).glob("*.txt"), key=lambda p: (int(p.stem.split("_")[0])
                                                                          if p.stem.split("_")[0].isdigit() else 0, p.name))
        for p in files:
            texts.append(clean(p.read_text(encoding="utf-8")))
            labels.append(lab)
    return Texts(texts, labels)


def _read_hf(name: str, split: str) -> Texts:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"source 'hf:{name}' needs the `datasets` package: pip install datasets "
                        "(or point --data-dir at a local copy)") from e
    ds = datasets.load_dataset(name, split={"unsup": "unsupervised"}.get(split, split))
    labels = None if split == "unsup" else [int(y) for y in ds["label"]]
    return Texts([clean(t) for t in ds["text"]], labels)


def load_texts(source: str | Path = "embedded", split: str = "train", *, seed: int | None = 0,
               limit: int | None = None) -> Texts:
    """Load one split ("train", "test" or "unsup") from a source (see the module docstring).

    Records are shuffled with `random.Random(seed)` (None keeps the file order), then cut to `limit`.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; use one of {SPLITS}")
    src = str(source)
    if src == "embedded":
        if split == "unsup":
            raise DataError("the embedded corpus has no 'unsup' split; use 'train' or 'test'")
        data, where = corpus_split(split), "the embedded corpus"
    elif src.startswith("hf:"):
        data, where = _read_hf(src[3:], split), src
    else:
        d = Path(src).expanduser()
        if not d.is_dir():
            raise MissingDataError(f"data directory {d} does not exist; pass --data-dir pointing at a folder of "
                                   "<split>.jsonl.gz files or an aclImdb/ folder, 'hf:imdb', or 'embedded'")
        files = [d / f"{split}.jsonl.gz", d / f"{split}.jsonl"]
        found = next((f for f in files if f.is_file()), None)
        acl = _acl_root(d)
        if found is not None:
            data, where = _read_jsonl(found), str(found)
        elif acl is not None:
            data, where = _read_acl(acl, split), str(acl)
        else:
            raise MissingDataError(f"no '{split}' split in {d}: expected {files[0].name} (gzipped JSON Lines) or an "
                                   f"aclImdb layout ({d}/{split}/pos/*.txt); check the path")
    _check(data, where, split)
    if seed is not None:
        idx = list(range(len(data)))
        random.Random(seed).shuffle(idx)
        data = data.take(idx)
    return data.head(limit)


def source_fingerprint(source: str | Path) -> str:
    """A short hash naming the data a source holds (its files' names and contents), for artefact caching.

    Contents, not modification times: a copy, a checkout or a re-provisioned data folder touches every mtime,
    and an mtime key would rebuild every model (an hour on IMDb); hashing the files takes a fraction of a second."""
    src = str(source)
    h = hashlib.sha256(src.encode())
    if src == "embedded":
        h.update(corpus_fingerprint().encode())
    elif not src.startswith("hf:"):
        d = Path(src).expanduser()
        if not d.is_dir():
            raise MissingDataError(f"data directory {d} does not exist; pass an existing folder or 'embedded'")
        h = hashlib.sha256()  # the same files under another path name are the same data
        for p in sorted(d.rglob("*")):
            if p.is_file():
                h.update(f"{p.relative_to(d)}:{p.stat().st_size}\n".encode())
                with p.open("rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
    return h.hexdigest()[:16]
