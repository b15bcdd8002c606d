"""TextEnv: text generation as a Gymnasium environment.

Importing the package registers `TextEnv-v0` (`textenv.env:TextEnv`, batched by
`textenv.vector:TextVectorEnv`). Models and tokenizers are passed at `make` time:

    gymnasium.make("TextEnv-v0", tokenizer=tok, reward_model=rm, prompts=[...], max_new_tokens=16)
    gymnasium.make_vec("TextEnv-v0", num_envs=64, tokenizer=tok, reward_model=rm, prompts=[...])
"""

import gymnasium

from textenv.char_tokenizer import char_tokenizer
from textenv.env import TextEnv
from textenv.episode import EpisodeSpec
from textenv.interaction import Turns
from textenv.kl import RefLogprob, RefLogprobEnv
from textenv.rewards import EndsWithReward, HFRewardModel, KeywordReward, LengthReward, RewardModel
from textenv.turns import TurnEnv
from textenv.vector import TextVectorEnv

__all__ = [
    "TextEnv",
    "EpisodeSpec",
    "Turns",
    "TextVectorEnv",
    "TurnEnv",
    "RefLogprob",
    "RefLogprobEnv",
    "RewardModel",
    "HFRewardModel",
    "EndsWithReward",
    "KeywordReward",
    "LengthReward",
    "char_tokenizer",
]

if "TextEnv-v0" not in gymnasium.registry:
    gymnasium.register(
        "TextEnv-v0",
        entry_point="textenv.env:TextEnv",
        vector_entry_point="textenv.vector:TextVectorEnv",
        # no registered kwargs: TextEnv's defaults are EpisodeSpec's, and `episode=` must not meet its own fields
    )
