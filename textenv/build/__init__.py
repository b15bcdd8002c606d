"""The offline model factory: data, the embedded corpus, BPE, GPT pretraining, reward model, judge.

This subpackage builds the models an RLHF run needs (`python -m textenv.build all`); the environment itself
(`textenv.env`, `vector`, `rewards`, `kl`, `lm`) never imports it.

    data.py, texts.py, corpus.py   IMDb loading (JSONL, aclImdb/, HF datasets) and the embedded corpus
    bpe.py                         byte-level BPE tokenizers
    pretrain.py, reward_train.py   a GPT-2-architecture LM; a DistilBERT-architecture sentiment classifier
    judge.py                       the held-out n-gram judge
    pipeline.py                    the cached build steps and the CLI (`python -m textenv.build`)
"""

from textenv.build.pipeline import Artifacts, BuildArgs, build, build_all, preset, set_threads

__all__ = ["Artifacts", "BuildArgs", "build", "build_all", "preset", "set_threads"]
