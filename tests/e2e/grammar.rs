//! The methods' own replies under their grammars (issue 48), in-process on the scripted
//! backend: a backend that constrains is handed each IterResearch round's grammar (the offered
//! tools, each with its argument's shape; on the last round only an answer), one that does not
//! gets free text that the loop parses and retries, and `methods.constrain = false` turns the
//! grammar off. The real model decoding under it is in tests/e2e/iterresearch.rs.

use std::sync::Arc;

use experient::api::auth::Keys;
use experient::backend::scripted::{Script, Scripted};
use experient::backend::{ChatRequest, OutputFormat};
use experient::config::Config;
use serde_json::{json, Value};

use crate::gate::call;
use crate::inprocess::serve_with;

/// Replies with a calculation in the first round and the answer after it.
fn researcher(r: &ChatRequest) -> Script {
    let prompt = r.messages.last().map(|m| m.content.as_str()).unwrap_or("");
    if prompt.contains("Its result:") {
        Script::words("Report: 391 it is.\nFinal answer: 391")
    } else {
        Script::words("Report: multiply.\nAction: calculate: 17 * 23")
    }
}

fn grammar(r: &ChatRequest) -> Option<&str> {
    match &r.sampling.format {
        OutputFormat::Grammar(g) => Some(g),
        _ => None,
    }
}

async fn research(s: &crate::inprocess::Server, experient: Value) -> (u16, Value) {
    call(
        s,
        "POST",
        "/v1/chat/completions",
        Some(json!({"model": "iterresearch:m", "experient": experient,
                    "messages": [{"role": "user", "content": "What is 17 times 23?"}]})),
    )
    .await
}

#[tokio::test]
async fn a_constraining_backend_gets_each_rounds_grammar() {
    let backend = Scripted::constraining(researcher);
    let s = serve_with(backend.clone(), Keys::default(), Config::default()).await;
    let (st, v) = research(&s, json!({"max_rounds": 2, "tools": ["calculate"]})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["experient"]["trace"]["constrained"], true, "{v}");
    assert_eq!(v["experient"]["trace"]["tool_calls"], 1, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "391");
    let asked: Vec<ChatRequest> = backend.received();
    assert_eq!(asked.len(), 2);
    // Round 1 may act, with only the chosen tool, its argument held to arithmetic.
    let first = grammar(&asked[0]).expect("round 1 is constrained");
    assert!(
        first.contains(r#"action: "Action: " ("calculate: " EXPRESSION)"#),
        "{first}"
    );
    assert!(!first.contains("python") && !first.contains("search_experience"));
    // The last round can only answer.
    let last = grammar(&asked[1]).expect("round 2 is constrained");
    assert!(
        last.contains("next: final") && !last.contains("Action"),
        "{last}"
    );
    // A client tool's argument is any line.
    let (st, v) = call(
        &s,
        "POST",
        "/v1/chat/completions",
        Some(json!({"model": "iterresearch:m", "experient": {"tools": []},
                    "tools": [{"type": "function", "function": {"name": "get_weather",
                        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
                    "messages": [{"role": "user", "content": "Weather in Paris?"}]})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let g = backend
        .received()
        .last()
        .map(|r| grammar(r).unwrap().to_owned());
    let g = g.unwrap();
    assert!(g.contains(r#"("get_weather: " LINE)"#), "{g}");
    s.stop().await;
}

#[tokio::test]
async fn free_text_is_parsed_and_unreadable_replies_are_retried() {
    let backend = Scripted::new(|_| Script::words("I like green turtles."));
    let s = serve_with(backend.clone(), Keys::default(), Config::default()).await;
    let (st, v) = research(&s, json!({"max_rounds": 2})).await;
    assert_eq!(st, 200, "{v}");
    let trace = &v["experient"]["trace"];
    assert_eq!(trace["constrained"], false, "{v}");
    assert_eq!(trace["rounds"][0]["malformed"], true, "{v}");
    assert_eq!(trace["rounds"][0]["retries"], 2, "{v}");
    assert_eq!(trace["stopped"], "round_limit", "{v}");
    assert!(backend.received().iter().all(|r| grammar(r).is_none()));
    s.stop().await;
}

#[tokio::test]
async fn the_grammar_can_be_turned_off_and_tools_are_checked() {
    let backend = Scripted::constraining(researcher);
    let mut config = Config::default();
    config.methods.constrain = false;
    let s = serve_with(Arc::clone(&backend), Keys::default(), config).await;
    let (st, v) = research(&s, json!({"max_rounds": 2})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["experient"]["trace"]["constrained"], false, "{v}");
    assert!(backend.received().iter().all(|r| grammar(r).is_none()));
    for (experient, model) in [
        (json!({"tools": ["fetch_url"]}), "iterresearch:m"),
        (json!({"tools": ["rm_rf"]}), "iterresearch:m"),
        (json!({"tools": ["calculate"]}), "m"),
    ] {
        let (st, v) = call(
            &s,
            "POST",
            "/v1/chat/completions",
            Some(json!({"model": model, "experient": experient,
                        "messages": [{"role": "user", "content": "hi"}]})),
        )
        .await;
        assert_eq!(
            (st, v["error"]["param"].as_str()),
            (400, Some("experient.tools")),
            "{v}"
        );
    }
    s.stop().await;
}
