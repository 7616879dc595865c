"""Sampling parameters and the batched, jittable sampler (greedy, temperature, top-k, top-p),
with OpenAI's presence and frequency penalties.

Each row of a decode batch carries its own parameters as arrays, so one compiled step serves
every mix of requests. A row's random key is `fold_in(key(seed), n)` for its n-th generated
token: a request's samples depend only on its seed and its logits, not on which slot or batch
it shares.

The sampling distribution of a row (`filtered_logits`): logits divided by the temperature, then
everything outside the `top_k` largest set to -inf, then everything outside the smallest prefix
(in descending probability, among those k) whose probability mass reaches `top_p`. Tokens tied
with the last kept logit are kept too. Temperature 0 is greedy (argmax, ties to the lowest id).
Penalties (`penalized_logits`) change the logits before all of this, greedy included.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

MAX_LOGPROBS = 5  # most alternatives reported per token (the OpenAI completions limit)


class InvalidRequestError(ValueError):
    """A request the engine cannot run; `param` names the offending field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    Attributes:
      max_tokens: most tokens to generate (>= 0).
      temperature: 0 for greedy, else the softmax temperature (> 0).
      top_k: keep the k most likely tokens (None: all).
      top_p: keep the smallest most-likely set with probability mass >= top_p, in (0, 1].
      stop: strings that end the completion (not included in its text).
      stop_token_ids: token ids that end it besides the tokenizer's end-of-text.
      seed: makes sampling reproducible (None: a fresh random seed).
      logprobs: report the chosen token's log-probability and this many most likely
        alternatives per token, 0..`MAX_LOGPROBS` (None: none).
      echo: also score the prompt (its tokens' log-probabilities, with `logprobs`).
      presence_penalty: subtracted from the logit of every token generated so far, in [-2, 2].
      frequency_penalty: times its count so far, subtracted from each token's logit, in [-2, 2].
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "stop", _as_tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids))
        checks = [
            ("max_tokens", _is_int(self.max_tokens) and self.max_tokens >= 0, "an integer >= 0"),
            (
                "temperature",
                _is_number(self.temperature) and 0 <= self.temperature < math.inf,
                "a finite number >= 0 (0 is greedy)",
            ),
            (
                "top_k",
                self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1),
                "None (no limit) or an integer >= 1",
            ),
            ("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            (
                "stop",
                all(isinstance(s, str) and s for s in self.stop),
                "non-empty strings",
            ),
            (
                "stop_token_ids",
                all(_is_int(i) and i >= 0 for i in self.stop_token_ids),
                "integers >= 0",
            ),
            (
                "seed",
                self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**32),
                "None or an integer in [0, 2**32)",
            ),
            (
                "logprobs",
                self.logprobs is None
                or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
                f"None or an integer in [0, {MAX_LOGPROBS}]",
            ),
            *(
                (name, _is_number(getattr(self, name)) and -2 <= getattr(self, name) <= 2,
                 "a number in [-2, 2]")
                for name in ("presence_penalty", "frequency_penalty")
            ),
        ]  # fmt: skip
        for name, ok, allowed in checks:
            if not ok:
                raise InvalidRequestError(
                    f"{name}={getattr(self, name)!r} is invalid: must be {allowed}", name
                )


def _as_tuple(value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, int)):
        return (value,)
    return tuple(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def choice_seeds(seed: int | None, n: int) -> list[int | None]:
    """Seeds of `n` choices of one request: `seed` itself for the first (so `n=1` is unchanged),
    independent ones derived from it for the others (None stays None: fresh random seeds)."""
    if seed is None:
        return [None] * n
    derived = (int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(1, n))
    return [seed, *derived]


def penalized_logits(
    logits_BxV: jax.Array, counts_BxV: jax.Array, presence_B: jax.Array, frequency_B: jax.Array
) -> jax.Array:
    """OpenAI's penalties: `logit[j] - count[j] * frequency - (count[j] > 0) * presence`.

    Args:
      logits_BxV: model logits.
      counts_BxV: int32 times each token was generated so far in the row's request.
      presence_B, frequency_B: float32 penalties per row.
    """
    counts_BxV = counts_BxV.astype(jnp.float32)
    return (
        logits_BxV.astype(jnp.float32)
        - counts_BxV * frequency_B[:, None]
        - (counts_BxV > 0) * presence_B[:, None]
    )


def filtered_logits(
    logits_BxV: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array
) -> jax.Array:
    """Each row's sampling distribution as logits (`-inf` outside top-k / top-p).

    Args:
      logits_BxV: float32 model logits.
      temperature_B: > 0 (a 0 row is treated as 1; `sample` takes its argmax instead).
      top_k_B: int32, 0 for no limit.
      top_p_B: float32 in (0, 1].

    Returns:
      `[B, V]` float32 logits whose softmax is the distribution `sample` draws from.
    """
    v = logits_BxV.shape[-1]
    temperature_B = jnp.where(temperature_B > 0, temperature_B, 1.0)
    scaled_BxV = logits_BxV.astype(jnp.float32) / temperature_B[:, None]
    sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)  # descending
    # 1. top-k: the first k ranks survive (k = V without a limit).
    k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, v), v)
    in_top_k_BxV = jnp.arange(v)[None, :] < k_B[:, None]
    # 2. top-p among those: rank r survives while the mass of the ranks before it is < p, so
    #    rank 0 always does and the kept set is the smallest whose mass reaches p.
    probs_BxV = jax.nn.softmax(jnp.where(in_top_k_BxV, sorted_BxV, -jnp.inf), axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = in_top_k_BxV & ((mass_before_BxV < top_p_B[:, None]) | (top_p_B[:, None] >= 1))
    # 3. the smallest kept logit is the row's threshold (ties with it are kept).
    last_kept_B = keep_BxV.sum(-1) - 1
    threshold_B = jnp.take_along_axis(sorted_BxV, last_kept_B[:, None], axis=-1)[:, 0]
    return jnp.where(scaled_BxV >= threshold_B[:, None], scaled_BxV, -jnp.inf)


def sample(
    logits_BxV: jax.Array,
    temperature_B: jax.Array,
    top_k_B: jax.Array,
    top_p_B: jax.Array,
    seed_B: jax.Array,
    counter_B: jax.Array,
) -> jax.Array:
    """Next token per row: argmax where the temperature is 0, else a draw from
    `filtered_logits` with the key `fold_in(key(seed), counter)`.

    Args:
      logits_BxV: float32 logits.
      temperature_B, top_k_B, top_p_B: as in `filtered_logits`.
      seed_B: uint32 per-request seeds.
      counter_B: int32 index of the token being drawn within its request.

    Returns:
      `[B]` int32 token ids.
    """
    keys_B = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seed_B, counter_B)
    # the sort behind top-k / top-p runs only when some row asks for them
    limited = jnp.any((top_k_B > 0) | (top_p_B < 1))
    filtered_BxV = jax.lax.cond(
        limited,
        lambda: filtered_logits(logits_BxV, temperature_B, top_k_B, top_p_B),
        lambda: (
            logits_BxV.astype(jnp.float32)
            / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
        ),
    )
    drawn_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BxV)
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    return jnp.where(temperature_B > 0, drawn_B, greedy_B).astype(jnp.int32)


def token_logprobs(
    logits_BxV: jax.Array, ids_B: jax.Array, num_top: int = MAX_LOGPROBS
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model's log-probabilities (temperature 1, unfiltered) of `ids_B` and of each row's
    `num_top` most likely tokens: `(logprob_B, top_ids_BxN, top_logprobs_BxN)`."""
    logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    chosen_B = jnp.take_along_axis(logp_BxV, ids_B[:, None], axis=-1)[:, 0]
    top_logprobs_BxN, top_ids_BxN = jax.lax.top_k(logp_BxV, num_top)
    return chosen_B, top_ids_BxN.astype(jnp.int32), top_logprobs_BxN
