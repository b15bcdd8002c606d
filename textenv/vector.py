"""TextVectorEnv: `num_envs` TextEnv episodes in one batched numpy state.

Same transitions, seeds and infos as `SyncVectorEnv([TextEnv] * num_envs)` (tests check it, fuzzed too), save
two harmless extras: `token_rewards` on steps where no episode ended (its `_token_rewards` all False) and, after a
partial reset, every env's `action_mask` rather than the reset rows' only. Unlike it, the
observation window of every env shifts in one numpy op, texts decode in one batched call, and all
episodes that finish on a step are scored in ONE reward-model call (the expensive part with a neural
reward model). Autoreset follows Gymnasium's default NEXT_STEP mode: the step after an episode ends
ignores that env's action and returns the first observation of its next episode with reward 0.
With `action_mask`, `infos["action_mask"]` is a bool array (num_envs, vocab_size) of the tokens allowed next
(see `textenv.masks` for its memory and a packed form). With `token_rewards`, one batched call per step pays every
live env its newest token's reward.

Groups (`group_size=k`): `reset()` gives envs g*k .. g*k+k-1 one prompt and budget (the first env of the group
draws them) and reports `infos["group"] = g`, so k episodes answer one prompt: what group-relative baselines
(RLOO, GRPO; `agents.ppo`'s `advantages`) compare. Autoreset draws each env's next prompt on its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.error import ResetNeeded
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from textenv.env import TextEnv, decode_rows
from textenv.masks import check_allowed
from textenv.rewards import pay_token_rewards


class TextVectorEnv(VectorEnv):
    """Batched `TextEnv`: `TextVectorEnv(num_envs, **TextEnv kwargs)`; the registered `vector_entry_point`."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int, group_size: int = 1, **kwargs: Any) -> None:
        if int(num_envs) != num_envs or num_envs < 1:
            raise ValueError(f"num_envs={num_envs!r} must be a positive int.")
        if int(group_size) != group_size or group_size < 1 or num_envs % group_size:
            raise ValueError(f"group_size={group_size!r} must be a positive divisor of num_envs={num_envs}: envs "
                             "g*k .. g*k+k-1 form group g.")
        self.group_size = int(group_size)
        self.env = TextEnv(**kwargs)  # validates arguments; holds the prompt cache, tokenizer, reward model
        if self.env.interaction is not None:
            raise ValueError("TextVectorEnv does not run interactions (multi-turn or tool episodes); use "
                             "gymnasium.make_vec('TextEnv-v0', ..., vectorization_mode='sync') (a SyncVectorEnv).")
        self.num_envs = int(num_envs)
        self.render_mode = self.env.render_mode
        self.single_observation_space = self.env.observation_space
        self.single_action_space = self.env.action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        E, W = self.num_envs, self.env.window
        self._rngs: list[np.random.Generator | None] = [None] * E  # one per env, as SyncVectorEnv's sub-envs
        self._obs = np.full((E, W), self.env.pad_token_id, dtype=np.int64)  # (E, W)
        self._length = np.zeros(E, dtype=np.int64)  # real tokens (prompt + completion)
        self._prompt_length = np.zeros(E, dtype=np.int64)
        self._new = np.zeros(E, dtype=np.int64)  # completion tokens so far
        self._budget = np.zeros(E, dtype=np.int64)
        self._prompt = np.full(E, None, dtype=object)
        self._autoreset = np.zeros(E, dtype=np.bool_)
        self._started = False
        masked = self.env.action_mask is not None
        self._mask = np.ones((E, self.env.vocab_size), dtype=np.bool_) if masked else None  # (E, V)
        self._paid: list[list[float]] = [[] for _ in range(E)]  # dense rewards paid so far, per env

    def get_attr(self, name: str) -> tuple:
        """`name` of every env, as `SyncVectorEnv.get_attr` gives it (all envs share one `TextEnv`'s settings)."""
        return (getattr(self.env, name),) * self.num_envs

    def _start(self, rows: np.ndarray, index: np.ndarray | None = None, grouped: bool = False) -> None:
        """Draw a new episode for each env in `rows` from its own generator (from prompt `index[i]` if given);
        `grouped`: an env whose group's first env starts too takes that env's episode (prompt and budget)."""
        k, drawn = self.group_size, {}
        for i in rows:
            if self._rngs[i] is None:
                self._rngs[i] = seeding.np_random()[0]
            leader = i - i % k
            if grouped and leader in drawn:
                ids, self._prompt[i], self._budget[i] = drawn[leader]
            else:
                pick = None if index is None else index[i]
                ids, self._prompt[i], self._budget[i] = drawn[i] = self.env.draw_episode(self._rngs[i], pick)
            self._obs[i] = self.env.pad_token_id
            self._obs[i, self.env.window - len(ids) :] = ids
            self._length[i] = self._prompt_length[i] = len(ids)
            self._new[i], self._paid[i] = 0, []
            if self._mask is not None:
                self._mask[i] = self.env.compute_mask(ids, [])
        self._autoreset[rows] = False

    def _infos(self, rows: np.ndarray, texts: np.ndarray) -> dict[str, np.ndarray]:
        """Vector-env infos (arrays plus `_key` masks) for the envs in `rows`."""
        mask = np.zeros(self.num_envs, dtype=np.bool_)
        mask[rows] = True
        prompt, text = np.full(self.num_envs, None, dtype=object), np.full(self.num_envs, None, dtype=object)
        prompt[rows], text[rows] = self._prompt[rows], texts[rows]
        length = np.where(mask, self._length, 0)
        prompt_length = np.where(mask, self._prompt_length, 0)
        infos = {
            "prompt": prompt, "_prompt": mask, "text": text, "_text": mask.copy(),
            "length": length, "_length": mask.copy(), "prompt_length": prompt_length, "_prompt_length": mask.copy(),
        }  # fmt: skip
        if self._mask is not None:
            infos["action_mask"], infos["_action_mask"] = self._mask.copy(), np.ones(self.num_envs, np.bool_)
        return infos

    def reset(
        self, *, seed: int | list[int | None] | None = None, options: dict | None = None
    ) -> tuple[np.ndarray, dict]:
        """Reset every env (or those in `options["reset_mask"]`); `seed` int -> seeds seed, seed+1, ...

        `options["prompt_index"]`, an int array of shape (num_envs,), starts env `i` from prompt (or text)
        `prompt_index[i]` instead of a random one (entries of envs not reset are ignored)."""
        if seed is None:
            seed = [None] * self.num_envs
        elif isinstance(seed, (int, np.integer)):
            seed = [int(seed) + i for i in range(self.num_envs)]
        if len(seed) != self.num_envs:
            raise ValueError(
                f"got {len(seed)} seeds for num_envs={self.num_envs}; pass one int or a list of num_envs."
            )
        mask = np.ones(self.num_envs, dtype=np.bool_)
        if options and "reset_mask" in options:
            mask = np.asarray(options["reset_mask"])
            if mask.shape != (self.num_envs,) or mask.dtype != np.bool_:
                raise ValueError(f"options['reset_mask'] must be a bool array of shape ({self.num_envs},).")
        index = None
        if options and "prompt_index" in options:
            index = np.asarray(options["prompt_index"])
            if index.shape != (self.num_envs,) or not np.issubdtype(index.dtype, np.integer):
                raise ValueError(
                    f"options['prompt_index'] must be an int array of shape ({self.num_envs},), one prompt index "
                    f"per env; got {options['prompt_index']!r}."
                )
        rows = np.flatnonzero(mask)
        if index is not None and self.group_size > 1:
            self._check_group_index(rows, index)
        for i in rows:
            if seed[i] is not None:
                self._rngs[i] = seeding.np_random(seed[i])[0]
        self._start(rows, index, grouped=True)
        self._started = True
        infos = self._infos(rows, self._prompt)
        if self.group_size > 1:
            infos["group"], infos["_group"] = np.arange(self.num_envs) // self.group_size, mask.copy()
        return self._obs.copy(), infos

    def _check_group_index(self, rows: np.ndarray, index: np.ndarray) -> None:
        """The envs of a group share their prompt: a `prompt_index` that gives one group two prompts is refused."""
        leaders = rows - rows % self.group_size
        starting = np.isin(leaders, rows)  # a follower takes its leader's episode only when the leader starts too
        split = starting & (index[rows] != index[leaders])
        if split.any():
            i = rows[split][0]
            raise ValueError(
                f"options['prompt_index'] gives env {i} prompt {index[i]} but the first env of its group "
                f"(env {leaders[split][0]}) prompt {index[leaders[split][0]]}; with group_size={self.group_size} "
                f"the envs of a group share one prompt: repeat each index {self.group_size} times."
            )

    def _check_actions(self, actions: Any) -> np.ndarray:
        a = np.asarray(actions)
        if a.shape != (self.num_envs,):
            raise ValueError(
                f"actions have shape {a.shape}; pass one token id per env, an integer array of shape ({self.num_envs},)."
            )
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(
                f"actions have dtype {a.dtype}; pass integer token ids (e.g. actions.astype(np.int64))."
            )
        bad = (a < 0) | (a >= self.env.vocab_size)
        if bad.any():
            raise ValueError(
                f"action {a[bad][0]} is out of range for a vocabulary of {self.env.vocab_size} tokens; pass token ids "
                f"in [0, {self.env.vocab_size}) (restrict the policy's logits to single_action_space.n)."
            )
        return a.astype(np.int64)

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        if not self._started:
            raise ResetNeeded("step() called before reset(); call envs.reset() first.")
        actions = self._check_actions(actions)
        E, W, env = self.num_envs, self.env.window, self.env
        restart = self._autoreset.copy()  # NEXT_STEP autoreset: these envs ignore their action
        live = ~restart
        if self._mask is not None:
            for i in np.flatnonzero(live & ~self._mask[np.arange(E), actions]):
                check_allowed(int(actions[i]), self._mask[i])  # raises, naming the action
        rewards = np.zeros(E, dtype=np.float64)

        # Append each live env's token: shift its window left by one, newest token last.
        self._obs[live, :-1] = self._obs[live, 1:]
        self._obs[live, -1] = actions[live]
        terminated = live & (actions == env.eos_token_id) & (self._new >= env.min_new_tokens)
        self._new[live] += 1
        self._length[live] += 1
        truncated = live & ~terminated & ((self._new >= self._budget) | (self._length >= W))
        done = terminated | truncated

        texts = np.full(E, None, dtype=object)
        rows = np.flatnonzero(live)
        texts[rows] = decode_rows(env.tokenizer, [self._obs[i, W - self._length[i] :].tolist() for i in rows])
        if self._mask is not None:  # an ended episode allows every token: its next action is ignored
            self._mask[done] = True
            for i in np.flatnonzero(live & ~done):
                row = self._obs[i, W - self._length[i] :]
                self._mask[i] = env.compute_mask(row[: self._prompt_length[i]], row[self._prompt_length[i] :])
        self._start(np.flatnonzero(restart))
        texts[restart] = self._prompt[restart]
        infos = self._infos(np.arange(E), texts)
        if env.token_rewards is not None and len(rows):
            new = [self._obs[i, W - self._new[i] :].tolist() for i in rows]
            rewards[rows] = pay_token_rewards(env.token_rewards, list(texts[rows]), new, [self._paid[i] for i in rows])
            infos["token_reward"], infos["_token_reward"] = rewards.copy(), live.copy()
            paid = np.full(E, None, dtype=object)
            for i in np.flatnonzero(done):
                paid[i] = list(self._paid[i])
            infos["token_rewards"], infos["_token_rewards"] = paid, done.copy()

        finished = np.flatnonzero(done)
        if len(finished):
            # One reward-model call for every episode that ends on this step.
            score = np.zeros(E)
            score[finished] = env.score(list(texts[finished]), list(self._prompt[finished]))
            rewards[finished] += score[finished]
            completion = np.full(E, None, dtype=object)
            completion[finished] = decode_rows(
                env.tokenizer, [self._obs[i, W - self._new[i] :].tolist() for i in finished]
            )
            infos.update(score=score, _score=done.copy(), completion=completion, _completion=done.copy())
        self._autoreset = done
        return self._obs.copy(), rewards, terminated, truncated, infos

    def render(self) -> tuple[str, ...] | None:
        if self.render_mode != "ansi":
            return None
        W = self.env.window
        completions = decode_rows(
            self.env.tokenizer, [self._obs[i, W - self._new[i] :].tolist() for i in range(self.num_envs)]
        )
        return tuple(f"{p}|{c}" for p, c in zip(self._prompt, completions, strict=True))
