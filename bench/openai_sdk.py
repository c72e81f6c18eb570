#!/usr/bin/env python3
"""The official openai Python SDK against experient, used the way agent frameworks use it.

Starts two servers from the release binary: one on the embedded model, and one whose model "up"
is the first server (upstream mode), then runs the same checks on both: forced, streamed and
multi-turn tool calls (with a library prior on the local one), schema-valid JSON through
`chat.completions.parse`, logprobs, the Responses API (create, stream, function calls,
previous_response_id, retrieve, delete) and legacy completions (create, stream).

    cargo build --release
    python3 -m pip install openai==3.57.0
    python3 bench/openai_sdk.py

Prints one line per check and exits non-zero if any failed.
"""
import json
import os
import sys

from openai import NotFoundError, OpenAI
from pydantic import BaseModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checks import check, finish  # noqa: E402 - the client scripts' one way to count
from server import Server  # noqa: E402 - the benches' one way to start experient
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 30}}}}}]


def run(client, model, prior_model):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]

    def forced():
        r = client.chat.completions.create(model=prior_model, messages=ask, tools=TOOLS,
                                           tool_choice="required", temperature=0)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None, r
        call = c.message.tool_calls[0]
        json.loads(call.function.arguments)
        return f"{call.function.name}({call.function.arguments})"

    def streamed():
        with client.chat.completions.stream(
                model=model, messages=ask, tools=TOOLS, temperature=0,
                tool_choice={"type": "function", "function": {"name": "get_weather"}}) as s:
            for _ in s:
                pass
            final = s.get_final_completion()
        call = final.choices[0].message.tool_calls[0]
        # The SDK's helper concatenates names repeated across deltas: one name means spec form.
        assert call.function.name == "get_weather", call
        json.loads(call.function.arguments)
        return f"{call.function.name}({call.function.arguments})"

    def multi_turn():
        r = client.chat.completions.create(model=model, messages=ask, tools=TOOLS,
                                           tool_choice="required", temperature=0)
        msg = r.choices[0].message
        history = ask + [msg, {"role": "tool", "tool_call_id": msg.tool_calls[0].id,
                               "content": '{"sky": "sunny"}'}]
        r2 = client.chat.completions.create(model=model, messages=history, tools=TOOLS,
                                            tool_choice="none", temperature=0, max_tokens=24)
        assert r2.choices[0].message.content, r2
        return repr(r2.choices[0].message.content)

    class Cat(BaseModel):
        name: str
        legs: int

    def parse():
        r = client.chat.completions.parse(
            model=model, temperature=0, max_tokens=60, response_format=Cat,
            messages=[{"role": "user", "content": "Describe a cat."}])
        cat = r.choices[0].message.parsed
        assert isinstance(cat, Cat), r
        return repr(cat)

    def logprobs():
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4, temperature=0, logprobs=True,
                                           top_logprobs=2)
        lp = r.choices[0].logprobs.content
        assert lp and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in lp), lp
        return " ".join(f"{t.token!r}:{t.logprob:.2f}" for t in lp)

    def responses():
        tool = {"type": "function", "name": "get_weather", "parameters": TOOLS[0]["function"]["parameters"]}
        r = client.responses.create(model=model, input="What is the weather in Paris?",
                                    tools=[tool], tool_choice="required", temperature=0)
        call = next(o for o in r.output if o.type == "function_call")
        r2 = client.responses.create(model=model, previous_response_id=r.id, tools=[tool],
                                     max_output_tokens=20, temperature=0,
                                     input=[{"type": "function_call_output",
                                             "call_id": call.call_id, "output": "sunny"}])
        assert r2.output_text, r2
        assert client.responses.retrieve(r2.id).output_text == r2.output_text
        client.responses.delete(r.id)
        try:
            client.responses.retrieve(r.id)
            raise AssertionError("a deleted response is still there")
        except NotFoundError:
            pass
        return f"{call.name}({call.arguments}) -> {r2.output_text!r}"

    def responses_stream():
        with client.responses.stream(model=model, input="Say hello.", max_output_tokens=200,
                                     temperature=0) as s:
            kinds = [e.type for e in s]
            final = s.get_final_response()
        assert kinds[0] == "response.created" and final.output_text, kinds
        return f"{len(kinds)} events, {final.output_text!r}"

    def completions():
        r = client.completions.create(model=model, prompt="The capital of France is",
                                      max_tokens=5, temperature=0)
        text = "".join(c.choices[0].text for c in client.completions.create(
            model=model, prompt="The capital of France is", max_tokens=5, temperature=0,
            stream=True))
        assert r.choices[0].text == text, (r, text)
        return repr(text)

    def embeddings():
        # The SDK asks for base64 unless told otherwise and decodes it itself.
        texts = ["How do I reset my password?", "I forgot my login and must change it.",
                 "The recipe needs two cups of flour."]
        r = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
        floats = client.embeddings.create(model="all-minilm-l6-v2", input=texts[2],
                                          encoding_format="float")
        v = [d.embedding for d in r.data]
        dot = lambda a, b: sum(x * y for x, y in zip(a, b))
        assert len(v) == 3 and len(v[0]) == 384, [len(x) for x in v]
        assert dot(v[0], v[1]) > dot(v[0], v[2]) + 0.3, (dot(v[0], v[1]), dot(v[0], v[2]))
        assert max(abs(a - b) for a, b in zip(v[2], floats.data[0].embedding)) < 1e-5
        return f"384 dims, paraphrase {dot(v[0], v[1]):.2f} vs other {dot(v[0], v[2]):.2f}, {r.usage.prompt_tokens} tokens"

    for name, fn in [("forced tool call", forced), ("streamed tool call", streamed),
                     ("multi-turn tools", multi_turn), ("parse (json_schema)", parse),
                     ("logprobs", logprobs), ("responses + previous_response_id", responses),
                     ("responses.stream", responses_stream), ("completions", completions),
                     ("embeddings (base64 and float)", embeddings)]:
        check(f"[{model}] {name}", fn)


def main():
    with Server() as local:
        up = f'[[models]]\nkind = "upstream"\nid = "up"\nbase_url = "{local.base}/v1"\nmodel = "smollm2-135m"\n'
        with Server(up) as front:
            local.post("/v1/libraries", {"name": "cities"})
            local.post("/v1/libraries/cities/experiences",
                       {"text": "Cities: pass the city name exactly as the user wrote it."})
            run(OpenAI(base_url=local.base + "/v1", api_key="unused"), "smollm2-135m",
                "smollm2-135m@cities")
            run(OpenAI(base_url=front.base + "/v1", api_key="unused"), "up", "up")
    finish()


if __name__ == "__main__":
    main()
