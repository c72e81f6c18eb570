//! IterResearch with the real embedded model: a task that needs two tool calls, the round
//! limit, unreadable replies, streaming of rounds, and the client-tools round trip through the
//! OpenAI client.
//!
//! The 135M model cannot plan tool use, but it does repeat a short text under the system
//! prompt "You repeat what the user says, word for word." So this test's deployment overrides
//! the round prompt (`EXPERIENT_PROMPTS_DIR`) with one that, per question and round, tells the
//! model what to say; the model still writes every reply, and the loop reads, acts on and
//! rebuilds from what it wrote.

use crate::common;

use async_openai::types::chat::{
    ChatCompletionMessageToolCalls, ChatCompletionRequestAssistantMessageArgs,
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessageArgs,
    ChatCompletionRequestToolMessageArgs, ChatCompletionRequestUserMessageArgs, ChatCompletionTool,
    ChatCompletionTools, CreateChatCompletionRequestArgs, FinishReason, FunctionObjectArgs,
};
use serde_json::{json, Value};

use crate::common::Server;

const REPEAT: &str = "You repeat what the user says, word for word.";

const ROUND_PROMPT: &str = r#"{% if "Atlantis" in question %}{% if round == 1 %}Say exactly:
Report: I must find the capital of Atlantis.
Action: search_experience: Atlantis capital
{% elif round == 2 %}Say exactly:
Report: The capital of Atlantis is Poseidonia.
Action: search_experience: Poseidonia population
{% else %}Say exactly:
Report: Poseidonia has 4200 people.
Final answer: 4200 people
{% endif %}{% elif "forever" in question %}Say exactly:
Report: I am still looking.
Action: search_experience: Atlantis
{% elif "program" in question %}{% if action %}Say exactly:
Report: The program printed {{ observation }}.
Final answer: {{ observation }}
{% elif "spin" in question %}Say exactly:
Report: I will run a program.
Action: python: while True: pass
{% else %}Say exactly:
Report: I will run a program.
Action: python: print(17 * 23)
{% endif %}{% elif "gibberish" in question %}Say exactly: I like green turtles.
{% elif "weather" in question %}{% if action %}Say exactly:
Report: {{ report }}
Final answer: {{ observation }}
{% else %}Say exactly:
Report: The Louvre is in Paris.
Action: get_weather: Paris
{% endif %}{% endif %}"#;

fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts");
    std::fs::create_dir_all(&prompts).unwrap();
    std::fs::write(prompts.join("iterresearch_round.j2"), ROUND_PROMPT).unwrap();
    let p = prompts.display().to_string();
    common::start_in(dir, None, &[("EXPERIENT_PROMPTS_DIR", &p)])
}

async fn chat(server: &Server, body: Value) -> Value {
    let (status, v) =
        crate::common::call("POST", &server.url("/v1/chat/completions"), Some(&body)).await;
    assert_eq!(status, 200, "{v}");
    v
}

fn ask(question: &str) -> Value {
    json!({
        "model": "iterresearch:smollm2-135m", "temperature": 0, "max_tokens": 48,
        "messages": [{"role": "system", "content": REPEAT}, {"role": "user", "content": question}],
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn rounds_tools_limits_and_streaming() {
    let s = server();
    let http = reqwest::Client::new();
    http.post(s.url("/v1/libraries"))
        .json(&json!({"name": "atlas"}))
        .send()
        .await
        .unwrap();
    for text in [
        "Atlantis: its capital city is Poseidonia.",
        "Poseidonia: about 4200 people live in the capital.",
    ] {
        http.post(s.url("/v1/libraries/atlas/experiences"))
            .json(&json!({ "text": text }))
            .send()
            .await
            .unwrap();
    }

    // Two tool calls, then an answer; each round's prompt holds no history. The search tool
    // searches the library the route names (and only it); "experiences": "none" keeps the
    // library's lessons out of the prompt, which this model could no longer repeat under.
    let mut body = ask("How many people live in the capital of Atlantis?");
    body["model"] = json!("iterresearch:smollm2-135m@atlas");
    body["experient"] = json!({"experiences": "none"});
    let v = chat(&s, body).await;
    let trace = &v["experient"]["trace"];
    assert_eq!(v["experient"]["method"], "iterresearch");
    assert_eq!(trace["stopped"], "answer", "{v}");
    assert_eq!(trace["tool_calls"], 2, "{v}");
    let rounds = trace["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    assert_eq!(rounds[0]["tool"], "search_experience");
    assert_eq!(rounds[1]["argument"], "Poseidonia population");
    assert!(
        rounds[0]["observation_chars"].as_u64().unwrap() > 20,
        "the search found the library's lessons"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("4200"),
        "{v}"
    );
    let used: u64 = rounds
        .iter()
        .map(|r| r["prompt_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(v["usage"]["prompt_tokens"].as_u64().unwrap(), used);

    // The round limit holds: a model that would search forever acts until the last round,
    // whose grammar admits only a final answer. (Without a grammar the loop stops it and
    // returns its report: tests/e2e/grammar.rs.)
    let mut body = ask("Keep searching forever.");
    body["experient"] = json!({"max_rounds": 2});
    let v = chat(&s, body).await;
    let trace = &v["experient"]["trace"];
    assert_eq!(trace["stopped"], "answer", "{v}");
    assert_eq!(trace["rounds"].as_array().unwrap().len(), 2);
    assert_eq!(trace["rounds"][0]["tool"], "search_experience", "{v}");
    assert_eq!(trace["rounds"][1]["answer"], true, "{v}");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("looking"),
        "{v}"
    );

    // A local model's rounds are decoded under the round grammar, so even a model told to
    // write something else writes a reply the loop can read. (Unreadable replies, retried, are
    // what free-text backends give: tests/e2e/grammar.rs.)
    let mut body = ask("Answer in gibberish.");
    body["experient"] = json!({"max_rounds": 2});
    let v = chat(&s, body).await;
    let trace = &v["experient"]["trace"];
    assert_eq!(trace["constrained"], true, "{v}");
    for r in trace["rounds"].as_array().unwrap() {
        assert!(r.get("malformed").is_none(), "{v}");
        assert_eq!(r["retries"], 0, "{v}");
    }
    assert!(!v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());

    // Streaming: each round is reported as it ends, then the answer as a normal completion.
    let body = ask("How many people live in the capital of Atlantis?");
    let chunks = common::stream_chunks(&s, body).await;
    let round_at: Vec<usize> = chunks
        .iter()
        .enumerate()
        .filter(|(_, c)| c["experient"]["round"].is_object())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(round_at.len(), 3, "{chunks:?}");
    let content_at = chunks
        .iter()
        .position(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .unwrap();
    assert!(round_at.iter().all(|&r| r < content_at));
    for c in &chunks[..chunks.len() - 1] {
        assert_eq!(
            c["choices"].as_array().unwrap().len(),
            1,
            "every chunk but usage has its choice"
        );
    }
    let last = chunks.last().unwrap();
    assert_eq!(last["experient"]["trace"]["tool_calls"], 2);
    assert!(last["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    assert!(common::metric(&s, "experient_iterresearch_rounds_total", "").await >= 9.0);

    // The python tool runs model-written code in the sandbox; a program that never ends is
    // stopped and reported, and the server carries on.
    let v = chat(&s, ask("Use a program to multiply 17 by 23.")).await;
    assert_eq!(
        v["experient"]["trace"]["rounds"][0]["tool"], "python",
        "{v}"
    );
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("391"),
        "{v}"
    );
    let v = chat(&s, ask("Run a program that makes the CPU spin.")).await;
    let first = &v["experient"]["trace"]["rounds"][0];
    assert_eq!(first["argument"], "while True: pass", "{v}");
    assert!(
        first["observation"]
            .as_str()
            .unwrap()
            .contains("TimeoutError"),
        "{v}"
    );
    assert_eq!(common::http_status(&s.url("/health")).unwrap(), 200);

    // The plan method, which writes its own program, refuses tools, with the field named.
    let r = http
        .post(s.url("/v1/chat/completions"))
        .json(
            &json!({"model": "plan:smollm2-135m", "messages": [{"role": "user", "content": "hi"}],
                      "tools": [{"type": "function", "function": {"name": "f"}}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], "tools");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_tools_round_trip_with_an_openai_client() {
    let s = server();
    let client = s.client();
    let tool = ChatCompletionTools::Function(ChatCompletionTool {
        function: FunctionObjectArgs::default()
            .name("get_weather")
            .description("The weather in a city now.")
            .parameters(json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))
            .build()
            .unwrap(),
    });
    let mut messages: Vec<ChatCompletionRequestMessage> = vec![
        ChatCompletionRequestSystemMessageArgs::default()
            .content(REPEAT)
            .build()
            .unwrap()
            .into(),
        ChatCompletionRequestUserMessageArgs::default()
            .content("What is the weather where the Louvre is?")
            .build()
            .unwrap()
            .into(),
    ];
    let request = |messages: Vec<ChatCompletionRequestMessage>| {
        CreateChatCompletionRequestArgs::default()
            .model("iterresearch:smollm2-135m")
            .messages(messages)
            .tools(vec![tool.clone()])
            .temperature(0.0)
            .max_tokens(48u32)
            .build()
            .unwrap()
    };

    let first = client
        .chat()
        .create(request(messages.clone()))
        .await
        .unwrap();
    let choice = &first.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::ToolCalls));
    let calls = choice.message.tool_calls.clone().unwrap();
    let ChatCompletionMessageToolCalls::Function(call) = &calls[0] else {
        panic!("a function call: {calls:?}")
    };
    assert_eq!(call.function.name, "get_weather");
    let args: Value = serde_json::from_str(&call.function.arguments).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    let report = choice.message.content.clone().unwrap();
    assert!(
        report.starts_with("Report:"),
        "the report travels in the message: {report}"
    );

    // The client runs the tool and sends the result back with the conversation so far.
    messages.push(
        ChatCompletionRequestAssistantMessageArgs::default()
            .content(report)
            .tool_calls(calls.clone())
            .build()
            .unwrap()
            .into(),
    );
    messages.push(
        ChatCompletionRequestToolMessageArgs::default()
            .tool_call_id(call.id.clone())
            .content("18 degrees and sunny")
            .build()
            .unwrap()
            .into(),
    );
    let second = client.chat().create(request(messages)).await.unwrap();
    let choice = &second.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::Stop));
    let answer = choice.message.content.clone().unwrap();
    assert!(answer.contains("18 degrees"), "{answer}");
}
