"""Offline batch generation over the engine: submit everything, step until done."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


@dataclass
class Output:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    num_cached_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)


class LLM:
    def __init__(self, model: str = "smollm2", device=None, dtype=None, **engine_config):
        self.engine = LLMEngine(model, device=device, dtype=dtype, **engine_config)
        self._ids = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: list[str] | list[list[int]] | str,
                 params: SamplingParams | list[SamplingParams] | None = None,
                 apply_chat_template: bool = False) -> list[Output]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: {len(params)} given for {len(prompts)} prompts")
        if apply_chat_template:
            if self.tokenizer is None:
                raise ValueError("apply_chat_template: this model has no tokenizer")
            prompts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        # Validate every prompt before queueing any, so a bad one leaves nothing behind.
        ids = [self.engine.tokenize(p) for p in prompts]
        for i, p in zip(ids, params):
            self.engine.validate_prompt(i, p)
        rids = []
        for i, p in zip(ids, params):
            self._ids += 1
            rid = f"offline-{self._ids}"
            self.engine.add_request(rid, i, p)
            rids.append(rid)
        results: dict[str, dict] = {r: dict(tokens=[], text=[], logprobs=[]) for r in rids}
        done: dict[str, Output] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                r = results[out.request_id]
                r["tokens"] += out.new_token_ids
                r["text"].append(out.text_delta)
                r["logprobs"] += out.new_logprobs
                if out.finished:
                    done[out.request_id] = Output(ids[rids.index(out.request_id)], r["tokens"], "".join(r["text"]),
                                                  out.finish_reason, out.num_cached_tokens, r["logprobs"])
        return [done[r] for r in rids]
