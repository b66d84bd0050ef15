#!/usr/bin/env python3
"""The official `openai` Python client against a running Tandem server.

Usage: openai_client.py BASE_URL MODEL   (e.g. http://127.0.0.1:8000/v1 smollm2)

Runs every check, prints one line per check, and exits non-zero if any
failed. `conductor/tests/openai_client.rs` starts `tandem up` and runs this
with the virtualenv that `scripts/setup.sh` installs (target/pyenv/openai).
"""

from __future__ import annotations

import argparse
import sys
import traceback

import openai

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_MAX_TOKENS = 32
PROMPT = "The history of the city of Rome begins"


class CheckFailed(Exception):
    pass


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def check_chat(client: openai.OpenAI, model: str) -> str:
    r = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=CHAT_MAX_TOKENS
    )
    expect(r.object == "chat.completion", f"object is {r.object!r}")
    expect(len(r.choices) == 1, f"{len(r.choices)} choices, expected 1")
    choice = r.choices[0]
    answer = choice.message.content or ""
    expect(choice.message.role == "assistant", f"role is {choice.message.role!r}")
    expect("Paris" in answer, f"answer {answer!r} does not mention Paris")
    expect(choice.finish_reason in ("stop", "length"), f"finish_reason {choice.finish_reason!r}")
    u = r.usage
    expect(u is not None, "no usage")
    expect(u.prompt_tokens > 0 and u.completion_tokens > 0, f"usage {u}")
    expect(u.total_tokens == u.prompt_tokens + u.completion_tokens, f"usage total {u}")
    return f"{answer!r} ({choice.finish_reason}, {u.prompt_tokens}+{u.completion_tokens} tokens)"


def check_chat_stream(client: openai.OpenAI, model: str) -> str:
    whole = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=CHAT_MAX_TOKENS
    )
    expected = whole.choices[0].message.content or ""
    stream = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        temperature=0,
        max_tokens=CHAT_MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, chunks = [], None, None, 0
    for chunk in stream:
        chunks += 1
        expect(chunk.object == "chat.completion.chunk", f"chunk object {chunk.object!r}")
        if chunk.usage is not None:
            expect(not chunk.choices, "the usage chunk has choices")
            usage = chunk.usage
        for c in chunk.choices:
            expect(usage is None, "a choice arrived after the usage chunk")
            if c.delta.content:
                text.append(c.delta.content)
            if c.finish_reason is not None:
                expect(finish is None, "two finish_reasons")
                finish = c.finish_reason
    streamed = "".join(text)
    expect(streamed == expected, f"streamed {streamed!r} != non-streamed {expected!r}")
    expect(finish in ("stop", "length"), f"finish_reason {finish!r}")
    expect(usage is not None, "no usage chunk despite stream_options.include_usage")
    expect(
        usage.completion_tokens == whole.usage.completion_tokens,
        f"streamed usage {usage} != non-streamed {whole.usage}",
    )
    return f"{chunks} chunks, same text, finish_reason {finish}, usage {usage.completion_tokens} tokens"


def check_completion_ignore_eos(client: openai.OpenAI, model: str) -> str:
    r = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    expect(r.object == "text_completion", f"object is {r.object!r}")
    c = r.choices[0]
    expect(r.usage is not None and r.usage.completion_tokens == 8, f"usage {r.usage}, expected 8 completion tokens")
    expect(c.finish_reason == "length", f"finish_reason {c.finish_reason!r}")
    expect(bool(c.text), "empty text")
    return f"{c.text!r}, 8 tokens, finish_reason length"


def check_completion_logprobs(client: openai.OpenAI, model: str) -> str:
    r = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    c = r.choices[0]
    lp = c.logprobs
    expect(lp is not None, "no logprobs")
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        values = getattr(lp, field)
        expect(values is not None and len(values) == 8, f"logprobs.{field} = {values!r}, expected 8 entries")
    expect("".join(lp.tokens) == c.text, f"tokens {lp.tokens!r} do not spell the text {c.text!r}")
    expect(all(x <= 0 for x in lp.token_logprobs), f"positive log-probability in {lp.token_logprobs}")
    # OpenAI gives the `logprobs` most likely tokens; vLLM adds the sampled one.
    expect(all(1 <= len(t) <= 3 for t in lp.top_logprobs), f"top_logprobs sizes {lp.top_logprobs}")
    # Greedy: the chosen token is the most likely one.
    for tok, top in zip(lp.tokens, lp.top_logprobs):
        expect(top.get(tok) == max(top.values()), f"greedy token {tok!r} is not the top one in {top}")
    return f"tokens {lp.tokens!r}"


def check_completion_stop(client: openai.OpenAI, model: str) -> str:
    full = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=16, temperature=0, logprobs=1, extra_body={"ignore_eos": True}
    ).choices[0]
    # A stop string taken from the greedy text itself, past its start.
    candidates = [t.strip() for t in full.logprobs.tokens[3:] if t.strip()]
    expect(bool(candidates), f"no usable stop string in {full.text!r}")
    stop = candidates[0]
    expected = full.text[: full.text.index(stop)]
    r = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    c = r.choices[0]
    expect(c.text == expected, f"stop {stop!r}: text {c.text!r}, expected {expected!r} (full {full.text!r})")
    expect(c.finish_reason == "stop", f"stop {stop!r}: finish_reason {c.finish_reason!r}")
    return f"stop {stop!r} cut {full.text!r} to {c.text!r}"


def check_completion_stream(client: openai.OpenAI, model: str) -> str:
    request = dict(model=model, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    expected = client.completions.create(**request).choices[0].text
    text, finish, usage = [], None, None
    for chunk in client.completions.create(**request, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text.append(c.text)
            finish = c.finish_reason or finish
    streamed = "".join(text)
    expect(streamed == expected, f"streamed {streamed!r} != non-streamed {expected!r}")
    expect(finish == "length", f"finish_reason {finish!r}")
    expect(usage is not None and usage.completion_tokens == 8, f"usage {usage}, expected 8 completion tokens")
    return f"{streamed!r}, finish_reason {finish}, usage {usage.completion_tokens} tokens"


def check_unknown_model(client: openai.OpenAI, model: str) -> str:
    name = model + "-does-not-exist"
    try:
        client.chat.completions.create(model=name, messages=QUESTION, max_tokens=4)
    except openai.NotFoundError as e:
        expect(e.status_code == 404, f"status {e.status_code}")
        expect(e.code == "model_not_found", f"error code {e.code!r}")
        return f"NotFoundError (404, {e.code})"
    raise CheckFailed(f"model {name!r} was served")


def check_zero_max_tokens(client: openai.OpenAI, model: str) -> str:
    try:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=0)
    except openai.BadRequestError as e:
        expect(e.status_code == 400, f"status {e.status_code}")
        expect(e.param == "max_tokens", f"error param {e.param!r}")
        return f"BadRequestError (400, param {e.param})"
    raise CheckFailed("max_tokens=0 was accepted")


def check_models(client: openai.OpenAI, model: str) -> str:
    ids = [m.id for m in client.models.list()]
    expect(model in ids, f"{model!r} not in {ids}")
    return f"models {ids}"


CHECKS = [
    ("chat", check_chat),
    ("chat stream", check_chat_stream),
    ("completion ignore_eos", check_completion_ignore_eos),
    ("completion logprobs", check_completion_logprobs),
    ("completion stop", check_completion_stop),
    ("completion stream", check_completion_stream),
    ("error unknown model", check_unknown_model),
    ("error max_tokens=0", check_zero_max_tokens),
    ("models", check_models),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url", help="e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("model", help="the served model's name")
    args = parser.parse_args()
    # No retries: a retried request would hide a server error.
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=120)
    print(f"openai {openai.__version__} against {args.base_url} (model {args.model!r})")
    failed = []
    for name, check in CHECKS:
        try:
            print(f"ok    {name}: {check(client, args.model)}", flush=True)
        except CheckFailed as e:
            failed.append(name)
            print(f"FAIL  {name}: {e}", flush=True)
        except openai.APIError as e:  # an HTTP error, or no connection
            failed.append(name)
            print(f"FAIL  {name}: {type(e).__name__}: {e}", flush=True)
        except Exception as e:  # e.g. the client could not parse a response
            failed.append(name)
            print(f"FAIL  {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(file=sys.stdout)
    print(f"{len(CHECKS) - len(failed)} of {len(CHECKS)} checks passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
