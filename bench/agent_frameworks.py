#!/usr/bin/env python3
"""Agent frameworks, unmodified, against experient: openai-agents, LangChain and pydantic-ai.

Starts two servers from the release binary, one on the embedded model and one whose model "up"
is the first server (upstream mode), and runs on both what these libraries send: ordinary
(non-strict) tool schemas with forced calls, streamed tool-call chunks, structured output in
json_schema and function-calling modes, and output types beside tools (openai-agents on its
chat and Responses models, pydantic-ai's native output). Each check asserts what the library
returned: a parsed call with arguments valid for the tool, or an instance of the output type.

    cargo build --release
    python3 -m pip install openai-agents==0.25.0 langchain-openai==1.8.1 \
        'pydantic-ai-slim[openai]==2.78.0'
    python3 bench/agent_frameworks.py

Prints one line per check and exits non-zero if any failed.
"""
import asyncio
import os
import sys

from pydantic import BaseModel, Field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checks import check, finish  # noqa: E402 - the client scripts' one way to count
from server import Server  # noqa: E402 - the benches' one way to start experient

# A plain dict tool as LangChain users write it: no "additionalProperties", no "strict".
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city's name."},
        "days": {"type": "integer", "description": "How many days ahead."}},
        "required": ["city", "days"]}}}
ASK = "What is the weather in Paris?"


class Report(BaseModel):
    city: str = Field(max_length=30)
    sunny: bool


def langchain(base, model):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=base + "/v1", api_key="unused", model=model, temperature=0,
                     max_tokens=60)

    def bind_tools():
        msg = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke(ASK)
        call = msg.tool_calls[0]
        assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str), msg
        assert isinstance(call["args"]["days"], int), msg
        return call["args"]

    def streamed_chunks():
        bound = llm.bind_tools([WEATHER], tool_choice="required")
        total = None
        for chunk in bound.stream(ASK):
            total = chunk if total is None else total + chunk
        call = total.tool_calls[0]
        assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str), total
        return call["args"]

    def structured(method):
        def run():
            r = llm.with_structured_output(Report, method=method).invoke("Is it sunny in Paris?")
            assert isinstance(r, Report), r
            return r
        return run

    def embeddings():
        # As LangChain documents for OpenAI-compatible servers: no tiktoken length check (its
        # encoding is OpenAI's, and fetched from the network), so the texts go as they are.
        from langchain_openai import OpenAIEmbeddings
        emb = OpenAIEmbeddings(base_url=base + "/v1", api_key="unused", model="all-minilm-l6-v2",
                               check_embedding_ctx_length=False)
        docs = emb.embed_documents(["How do I reset my password?", "The recipe needs flour."])
        q = emb.embed_query("I forgot my login.")
        dot = lambda a, b: sum(x * y for x, y in zip(a, b))
        assert len(docs) == 2 and len(q) == 384, (len(docs), len(q))
        assert dot(q, docs[0]) > dot(q, docs[1]), (dot(q, docs[0]), dot(q, docs[1]))
        return f"query nearer the paraphrase: {dot(q, docs[0]):.2f} vs {dot(q, docs[1]):.2f}"

    return [("bind_tools, non-strict schema, named choice", bind_tools),
            ("streamed tool-call chunks", streamed_chunks),
            ("with_structured_output json_schema", structured("json_schema")),
            ("with_structured_output function_calling", structured("function_calling")),
            ("OpenAIEmbeddings (base64)", embeddings)]


class Calls:
    """The tool's calls in one run: a framework only calls the tool with arguments it parsed
    and validated, so each one is a call the server returned well-formed."""

    def __init__(self):
        self.cities = []

    def weather(self, city):
        assert isinstance(city, str) and city, city
        self.cities.append(city)
        return f"sunny in {city}"

    def outcome(self, output, looped):
        """An instance of the output type, or, when the model kept calling the tool until the
        framework's turn limit, the calls it made (all well-formed): what the 135M model does,
        not a protocol failure. Anything else raised is a failure."""
        if looped:
            assert self.cities, "the turn limit was reached without a single call"
            return f"no final answer: the model called the tool {len(self.cities)} times, every call well-formed"
        assert isinstance(output, Report), output
        return f"{output!r} after {len(self.cities)} calls"


def openai_agents(base, model):
    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel,
                        Runner, function_tool, set_tracing_disabled)
    from agents.exceptions import MaxTurnsExceeded
    from openai import AsyncOpenAI

    set_tracing_disabled(True)

    def run(kind):
        def go():
            calls = Calls()

            @function_tool
            def get_weather(city: str) -> str:
                """The weather now in a city."""
                return calls.weather(city)

            async def once():
                # Closed inside the loop that used it, or its connections are closed later
                # by a loop that is gone (a traceback on stderr, not a failure).
                async with AsyncOpenAI(base_url=base + "/v1", api_key="unused") as client:
                    agent = Agent(name="weather", model=kind(model=model, openai_client=client),
                                  tools=[get_weather], output_type=Report,
                                  instructions="Find the weather, then report it.",
                                  model_settings=ModelSettings(temperature=0, max_tokens=80))
                    return await Runner.run(agent, "Is it sunny in Paris?", max_turns=6)

            try:
                r = asyncio.run(once())
            except MaxTurnsExceeded:
                return calls.outcome(None, looped=True)
            return calls.outcome(r.final_output, looped=False)
        return go

    def output_only():
        async def once():
            async with AsyncOpenAI(base_url=base + "/v1", api_key="unused") as client:
                agent = Agent(name="weather", output_type=Report,
                              model=OpenAIChatCompletionsModel(model=model, openai_client=client),
                              instructions="Report the weather in the city the user names.",
                              model_settings=ModelSettings(temperature=0, max_tokens=80))
                return await Runner.run(agent, "Paris is sunny today.", max_turns=2)

        r = asyncio.run(once())
        assert isinstance(r.final_output, Report), r.final_output
        return r.final_output

    return [("output_type alone", output_only),
            ("tools + output_type, chat model", run(OpenAIChatCompletionsModel)),
            ("tools + output_type, Responses model", run(OpenAIResponsesModel))]


def pydantic_ai(base, model):
    from pydantic_ai import Agent, NativeOutput, UsageLimitExceeded
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.usage import UsageLimits

    llm = OpenAIChatModel(model, provider=OpenAIProvider(base_url=base + "/v1", api_key="unused"))

    def run(output_type):
        def go():
            calls = Calls()
            agent = Agent(llm, output_type=output_type,
                          model_settings={"temperature": 0, "max_tokens": 80})

            @agent.tool_plain
            def get_weather(city: str) -> str:
                """The weather now in a city."""
                return calls.weather(city)

            try:
                r = agent.run_sync("Is it sunny in Paris?",
                                   usage_limits=UsageLimits(request_limit=6))
            except UsageLimitExceeded:
                return calls.outcome(None, looped=True)
            return calls.outcome(r.output, looped=False)
        return go

    return [("a tool and a structured output (tool output)", run(Report)),
            ("a tool and a native structured output", run(NativeOutput(Report)))]


def main():
    with Server() as local:
        up = f'[[models]]\nkind = "upstream"\nid = "up"\nbase_url = "{local.base}/v1"\nmodel = "smollm2-135m"\n'
        with Server(up) as front:
            for base, model in [(local.base, "smollm2-135m"), (front.base, "up")]:
                for lib, checks in [("langchain", langchain), ("openai-agents", openai_agents),
                                    ("pydantic-ai", pydantic_ai)]:
                    for name, fn in checks(base, model):
                        check(f"[{model}] {lib}: {name}", fn)
    finish()


if __name__ == "__main__":
    main()
