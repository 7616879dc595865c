"""`Engine`: batched text generation from a jmoe language model, for scripts, notebooks and the
HTTP server.

    engine = Engine.from_run("runs/tiny")              # a train.py run directory
    engine = Engine.from_hf("Mixtral-8x7B-Instruct")   # or a Hugging Face checkpoint
    [out] = engine.generate("def main(", max_tokens=32)
    print(out.text, out.finish_reason, out.active_experts)

An engine owns a fixed number of decode slots and a KV cache for them (`jmoe.serve.batching`):
requests join and leave between decode steps. `generate` runs the steps in the calling thread;
a server calls `start()` once and `submit`s requests from any thread.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jmoe.compress.quantize import quantize_experts
from jmoe.compress.surgery import expert_param_bytes
from jmoe.convert import from_hf
from jmoe.hf_tokenizer import load_hf_tokenizer
from jmoe.lm.config import ModelConfig
from jmoe.lm.param_layout import unstack_layers
from jmoe.serve.batching import Request, Scheduler
from jmoe.serve.offload_steps import OffloadSteps
from jmoe.serve.outputs import Completion, Update
from jmoe.serve.runs import load_run
from jmoe.serve.sampling import InvalidRequestError, SamplingParams
from jmoe.serve.steps import ModelSteps

Prompt = str | Sequence[int]


def length_buckets(max_len: int, smallest: int) -> tuple[int, ...]:
    """Padded lengths: powers of two from `smallest` below `max_len`, then `max_len` itself."""
    buckets, b = [], smallest
    while b < max_len:
        buckets.append(b)
        b *= 2
    return (*buckets, max_len)


class Engine:
    """Continuous-batching generation over `jmoe.lm.model.Transformer.decode`.

    Args:
      config: the model's `ModelConfig` (or a run's `Config`, whose `model` is used).
      variables: `{"params": ..., "moe_state": ...}` in the config's layer layout.
      tokenizer: a `jmoe.train.tokenizer.Tokenizer` (its `eos_ids` end a completion).
      num_slots: requests decoded together.
      max_queue: most requests waiting for a slot (`submit` raises `QueueFullError` beyond).
      name: the model id reported by the server.
      chat_template: a Jinja chat template (Hugging Face format), or None.
      smallest_bucket: the shortest padded prompt length.
      smallest_cache: the shortest cache length a decode step reads (then doubling up to the
        context: longer contexts cost more attention, more lengths more compilations).
      offload_experts: keep the routed experts in host memory and only `expert_cache` of
        them on the device (`jmoe.serve.offload_steps.OffloadSteps`; same tokens, slower steps).
      expert_cache: the device cache size with `offload_experts`, in experts or bytes
        ("512MiB"); default: one layer's experts.
    """

    def __init__(
        self,
        config,
        variables: dict,
        tokenizer,
        *,
        num_slots: int = 16,
        max_queue: int = 256,
        name: str = "jmoe",
        chat_template: str | None = None,
        smallest_bucket: int = 16,
        smallest_cache: int = 64,
        offload_experts: bool = False,
        expert_cache: int | str | None = None,
    ):
        config = getattr(config, "model", config)
        if not isinstance(config, ModelConfig):
            raise TypeError(f"Engine needs a ModelConfig (or a run Config), got {type(config)}")
        if num_slots < 1 or max_queue < 0:
            raise ValueError(f"{num_slots=} must be >= 1 and {max_queue=} >= 0")
        if not config.moe.router.token_choice:
            raise ValueError(
                f"router kind {config.moe.router.kind!r} is not causal (a token's experts depend "
                "on the other tokens of the batch), so it cannot generate text; serve a "
                "token-choice router"
            )
        if config.scan_layers:  # the unrolled layout lets each MoE layer's routing be read
            variables = {k: unstack_layers(config, v) for k, v in variables.items()}
        # Serving is dropless: with a capacity, a token's output would depend on its batch.
        moe = dataclasses.replace(config.moe, capacity_factor=None, eval_capacity_factor=None)
        serving = dataclasses.replace(config, scan_layers=False, remat="none", moe=moe)
        self.config = serving
        self.tokenizer = tokenizer
        self.name = name
        self.chat_template = chat_template
        self.vocab_size = min(tokenizer.vocab_size, config.vocab_size)
        self.max_seq_len = config.max_seq_len
        if offload_experts:
            self.steps = OffloadSteps(
                serving, variables, num_slots, self.vocab_size, cache_size=expert_cache
            )
        elif expert_cache is not None:
            raise ValueError("expert_cache sizes the offloaded experts: pass offload_experts=True")
        else:
            self.steps = ModelSteps(serving, variables, num_slots, self.vocab_size)
        self.buckets = length_buckets(config.max_seq_len, smallest_bucket)
        self.cache_buckets = length_buckets(config.max_seq_len, smallest_cache)
        self.scheduler = Scheduler(
            self.steps, tokenizer, self.buckets, self.cache_buckets, max_queue
        )

    @classmethod
    def from_run(
        cls, run_dir: str | os.PathLike, *, quantize: str | None = None, **kwargs
    ) -> Engine:
        """An engine for the newest checkpoint of a `train.py` run directory (its config,
        tokenizer and chat template); the model id is the directory's name.

        Args:
          run_dir: the run directory.
          quantize: None, or "int8" / "fp8" to quantize the experts before serving
            (`jmoe.compress.quantize.quantize_experts`).
          **kwargs: as for `Engine`.

        Raises:
          FileNotFoundError: naming what the directory lacks.
        """
        run = load_run(run_dir)
        config, variables = run.config.model, run.variables
        if quantize is not None:
            config, variables = quantize_experts(config, variables, quantize)
        kwargs = {"name": run.name, "chat_template": run.chat_template, **kwargs}
        return cls(config, variables, run.tokenizer, **kwargs)

    @classmethod
    def from_hf(
        cls,
        directory: str | os.PathLike,
        *,
        dtype=None,
        max_seq_len: int | None = None,
        quantize: str | None = None,
        **kwargs,
    ) -> Engine:
        """An engine for a Hugging Face checkpoint directory (`jmoe.convert.from_hf`) with its
        tokenizer, stop ids and chat template (`jmoe.hf_tokenizer.load_hf_tokenizer`); the model
        id is the directory's name.

        Args:
          directory: holds `config.json`, the safetensors weights and `tokenizer.json`.
          dtype: parameter and compute dtype (default: the checkpoint's).
          max_seq_len: the longest sequence served (default: the checkpoint's
            `max_position_embeddings`); the KV cache holds this many positions per slot.
          quantize: None, or "int8" / "fp8" to quantize the experts before serving
            (`jmoe.compress.quantize.quantize_experts`).
          **kwargs: as for `Engine`.

        Raises:
          FileNotFoundError: the directory or its `tokenizer.json` does not exist.
          ValueError: a checkpoint `jmoe.convert` cannot read (`CheckpointError`), or a
            tokenizer that does not fit the model.
        """
        root = pathlib.Path(directory).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"checkpoint directory {str(root)!r} does not exist")
        tokenizer = load_hf_tokenizer(root)
        config, variables = from_hf(root, dtype=dtype)
        if quantize is not None:
            config, variables = quantize_experts(config, variables, quantize)
        if max_seq_len is not None:
            config = dataclasses.replace(config, max_seq_len=max_seq_len)
        if bad := [i for i in tokenizer.eos_ids if i >= config.vocab_size]:
            raise ValueError(
                f"{root}: end-of-text id(s) {bad} of the tokenizer are outside the model's "
                f"vocabulary of {config.vocab_size} (config.json vocab_size)"
            )
        kwargs = {"name": root.resolve().name, "chat_template": tokenizer.chat_template, **kwargs}
        return cls(config, variables, tokenizer, **kwargs)

    @property
    def num_slots(self) -> int:
        return self.steps.num_slots

    @property
    def device_expert_bytes(self) -> int:
        """Device bytes of routed expert weights: all of them, or the offloaded experts'
        cache."""
        if isinstance(self.steps, OffloadSteps):
            return self.steps.expert_cache.resident_bytes
        return expert_param_bytes(self.config, self.steps.variables)

    # ---------------------------------------------------------------------- requests

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt, with the special tokens its tokenizer adds to prompts
        (`encode_prompt`: a Hugging Face checkpoint's leading BOS); ids are passed through and
        checked by `check`."""
        if isinstance(prompt, str):
            return self.tokenizer.encode_prompt(prompt)
        return [int(i) for i in prompt]

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises `InvalidRequestError` for a prompt the model cannot run.

        Empty prompts, ids outside `[0, vocab_size)`, and a prompt plus `max_tokens` longer than
        the context (`max_seq_len`) are refused.
        """
        n, context = len(prompt_ids), self.max_seq_len
        if n == 0:
            raise InvalidRequestError("the prompt is empty: give at least one token", "prompt")
        ids = np.asarray(prompt_ids)
        bad = np.flatnonzero((ids < 0) | (ids >= self.vocab_size))
        if bad.size:
            i = int(bad[0])
            raise InvalidRequestError(
                f"prompt token id {int(ids[i])} at position {i} is outside the vocabulary "
                f"[0, {self.vocab_size})",
                "prompt",
            )
        if n > context:
            raise InvalidRequestError(
                f"the prompt has {n} tokens but the model's context holds {context} "
                f"(max_seq_len): shorten the prompt",
                "prompt",
            )
        if n + params.max_tokens > context:
            raise InvalidRequestError(
                f"the prompt's {n} tokens + max_tokens={params.max_tokens} = "
                f"{n + params.max_tokens} exceed the model's context of {context} tokens "
                f"(max_seq_len): lower max_tokens to at most {context - n} or shorten the prompt",
                "max_tokens",
            )

    def submit(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams],
        listeners: Sequence[Callable[[Update], None] | None] | None = None,
        *,
        limit: bool = True,
    ) -> list[Request]:
        """Checks and queues `prompts` together (all or none) and returns their requests.

        `params` applies to every prompt, or gives each prompt its own.

        A request's `done` event is set when its `completion` is ready; its listener (called on
        the engine's thread) sees each `Update`. Needs `start()`, or steps run by `generate`.

        Raises:
          InvalidRequestError: for a prompt the model cannot run.
          QueueFullError: when the queue has no room (with `limit`).
          ClosedError: after `stop()`.
        """
        listeners = listeners or [None] * len(prompts)
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        requests = []
        for prompt, p, listener in zip(prompts, params, listeners, strict=True):
            ids = self.encode(prompt)
            self.check(ids, p)
            requests.append(Request(ids, p, self.tokenizer, listener))
        self.scheduler.submit(requests, limit=limit)
        return requests

    def cancel(self, request: Request) -> None:
        """Ends a request early (finish reason "cancelled"), freeing its slot."""
        self.scheduler.cancel(request)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] = (),
        seed: int | None = None,
        logprobs: int | None = None,
        echo: bool = False,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
    ) -> list[Completion]:
        """Completes each prompt; all of them are batched together.

        The keyword arguments are the fields of `SamplingParams`: temperature 0, the default,
        is greedy, and `seed` applies to each prompt.

        Args:
          prompts: a text, a list of token ids, or a list of either.

        Returns:
          One `Completion` per prompt, in order.
        """
        single = isinstance(prompts, str) or (
            len(prompts) > 0 and all(isinstance(p, (int, np.integer)) for p in prompts)
        )
        prompts = [prompts] if single else list(prompts)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop=stop,
            stop_token_ids=stop_token_ids,
            seed=seed,
            logprobs=logprobs,
            echo=echo,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
        )
        requests = self.submit(prompts, params, limit=False)
        if self.scheduler.running:
            for request in requests:
                request.done.wait()
        else:
            self.scheduler.run_until_idle()
        return [request.completion for request in requests]

    # ---------------------------------------------------------------------- lifecycle

    def warmup(self, scoring: bool = False) -> None:
        """Compiles the prefill of every prompt bucket and the decode steps of every cache
        length (before any request runs; `scoring` also compiles the prefills that score the
        prompt)."""
        if self.scheduler.has_work():
            raise RuntimeError("warmup must run before any request is submitted")
        row = Request([0], SamplingParams(), self.tokenizer).sampling_row()
        s = self.num_slots
        rows = {k: np.full(s, v) for k, v in row.items()}
        rows.update(active=np.zeros(s, bool), counter=np.zeros(s, np.int32))
        for bucket in self.buckets:
            for prompt_logprobs in (False, True) if scoring else (False,):
                self.steps.prefill(0, [0], bucket, row, prompt_logprobs)
        for length in self.cache_buckets:
            for n in {1, s}:  # a lone request, and every slot
                rows_n = {k: v[:n] for k, v in rows.items()}
                jax.block_until_ready(self.steps.decode(np.zeros(n, np.int32), rows_n, length))

    def start(self) -> None:
        """Runs the scheduler in a background thread (requests from `submit` then proceed)."""
        self.scheduler.start()

    def stop(self, cancel: bool = False) -> None:
        """Stops accepting requests, then finishes (or cancels) those in flight; afterwards the
        engine is idle and usable again (`generate`, or `start` for another server)."""
        self.scheduler.stop(cancel)
