"""From a request body to what the engine takes: readiness and model checks, prompt token ids,
and sampling parameters. Every refusal is a 400 (or 404/503) that names the field."""

from __future__ import annotations

import asyncio
from typing import Any

from phalanx_serve.chat_template import ChatTemplateError
from phalanx_serve.errors import APIError, bad_request
from phalanx_serve.protocol import ChatCompletionRequest, SamplingFields
from phalanx_serve.runtime import ServerRuntime
from phalanx_serve.sampling import SamplingParams
from phalanx_serve.settings import ServerSettings


def check_ready(rt: ServerRuntime) -> None:
    if not rt.ready:
        rt.metrics.request_rejected("not_ready")
        raise APIError(
            503,
            f"model is not ready ({rt.health()})",
            type_="service_unavailable",
            headers={"Retry-After": "5"},
        )


def check_model(model: str | None, settings: ServerSettings) -> None:
    if model is not None and model != settings.model_name:
        raise APIError(
            404,
            f"The model {model!r} does not exist; this server serves {settings.model_name!r}",
            code="model_not_found",
            param="model",
        )


async def tokenize_completion_prompt(
    rt: ServerRuntime, prompt: str | list[int]
) -> tuple[list[int], str]:
    assert rt.loaded is not None
    tokenizer = rt.loaded.tokenizer
    if isinstance(prompt, list):
        vocab = rt.loaded.config.vocab_size
        if prompt and max(prompt) >= vocab:
            raise bad_request(
                f"prompt token ids must be below the vocabulary size {vocab}", param="prompt"
            )
        return prompt, tokenizer.decode(prompt, skip_special_tokens=False)
    # Tokenizing a long prompt takes a while; keep the event loop free for other clients.
    ids = await _encode(tokenizer.encode, prompt, param="prompt")
    return ids, prompt


async def _encode(encode: Any, text: str, param: str, **kwargs: Any) -> list[int]:
    try:
        encoding = await asyncio.to_thread(encode, text, **kwargs)
    except Exception as exc:  # the tokenizer refusing text is the input's fault
        raise bad_request(f"{param} could not be tokenized: {exc}", param=param) from exc
    return list(encoding.ids)


async def tokenize_chat_prompt(
    rt: ServerRuntime, body: ChatCompletionRequest
) -> tuple[list[int], str]:
    assert rt.loaded is not None
    assert rt.chat_template is not None
    messages = [m.for_template() for m in body.messages]
    try:
        text = rt.chat_template.render(
            messages,
            add_generation_prompt=body.add_generation_prompt,
            bos_token=rt.loaded.bos_token or "",
            eos_token=rt.loaded.eos_token or "",
        )
    except ChatTemplateError as exc:
        raise bad_request(str(exc), param="messages") from exc
    # A model's own template writes its special tokens itself; the default one does not.
    add_special = rt.loaded.chat_template is None or rt.settings.chat_template is not None
    ids = await _encode(
        rt.loaded.tokenizer.encode, text, param="messages", add_special_tokens=add_special
    )
    return ids, text


def _token_ids(values: list[int], vocab: int, param: str) -> tuple[int, ...]:
    if any(not 0 <= t < vocab for t in values):
        raise bad_request(
            f"{param} must be token ids below the vocabulary size {vocab}", param=param
        )
    return tuple(values)


def _logit_bias(bias: dict[str, float] | None, vocab: int) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    out = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab:
            raise bad_request(
                f"logit_bias keys must be token ids below the vocabulary size {vocab}, got {key!r}",
                param="logit_bias",
            )
        out.append((token, value))
    return tuple(out)


def sampling_params(
    rt: ServerRuntime,
    body: SamplingFields,
    prompt_len: int,
    max_tokens: int,
    *,
    copy: int = 0,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    track_logprob: bool = False,
) -> SamplingParams:
    assert rt.loaded is not None
    limit = rt.max_model_len
    vocab = rt.loaded.config.vocab_size
    if prompt_len == 0:
        raise bad_request("the prompt is empty after tokenization", param="prompt")
    if prompt_len + max_tokens > limit:
        raise bad_request(
            f"this model's maximum context length is {limit} tokens, but {prompt_len + max_tokens} "
            f"were requested ({prompt_len} in the prompt, {max_tokens} for the completion); "
            "shorten the prompt or lower max_tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if body.min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens})",
            param="min_tokens",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None or body.top_k < 0 else body.top_k,
        min_p=body.min_p or 0.0,
        # Choices of one request differ; with a seed each choice is still reproducible.
        seed=None if body.seed is None else (body.seed + copy) % 2**63,
        stop=body.stop_strings(),
        stop_token_ids=_token_ids(body.stop_token_ids or [], vocab, "stop_token_ids"),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        logit_bias=_logit_bias(body.logit_bias, vocab),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        track_logprob=track_logprob,
    )
