"""RLHF with a real pretrained LM: `agents.rlhf`'s `smollm2` preset on IMDb, measured against its
targets (held-out judge positive rate >= 0.95, reward gain >= +1.53, KL <= 6 nats, reference perplexity <= 1.3x,
distinct-2 >= 0.8x the start and >= 0.8x real reviews of the same lengths, under 5% identical responses, at or above
best-of-16 at its KL, <= 30 minutes with the models cached, the warm start <= 25 minutes once; the first fetch +
conversion of SmolLM2 timed apart). What a reader says of the texts is measured apart: a blind reading
(../shared/tools/blind_reading.py on the JSON this writes).

    python benchmarks/rlhf_smollm2.py              # full run; benchmarks/results/rlhf_smollm2.json + _report.md
    python benchmarks/rlhf_smollm2.py --quick      # smoke run

Every flag of benchmarks/rlhf_imdb.py applies (`--learning-rate`, `--kl-target`, `--total-timesteps`, ...).
"""

from __future__ import annotations

import dataclasses

import tyro
from rlhf_imdb import Args, main

if __name__ == "__main__":
    main(tyro.cli(Args, default=dataclasses.replace(Args(), preset="smollm2"), description=__doc__))
