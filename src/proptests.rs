//! Property tests of the parsers that a client's bytes or a model's words reach: whatever they
//! are given, they return a value or an error and never panic (a panic in a request handler is
//! a 500; in the store's replay it would keep a library from opening). The log's replay has its
//! own properties in `experience::library`'s tests.

use proptest::prelude::*;
use serde_json::{json, Value};

use crate::api::error::parse_json;
use crate::api::wire::{ChatCompletionRequest, RequestLimits};
use crate::experience::Query;

/// Field names a chat request really has, so that generated objects reach deep into parsing
/// and validation instead of stopping at an unknown shape.
const FIELDS: &[&str] = &[
    "model",
    "messages",
    "role",
    "content",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "logit_bias",
    "seed",
    "stream",
    "stream_options",
    "include_usage",
    "tools",
    "tool_choice",
    "tool_calls",
    "tool_call_id",
    "type",
    "text",
    "function",
    "name",
    "arguments",
    "parameters",
    "response_format",
    "experient",
    "method",
    "library",
    "experiences",
    "max_rounds",
    "workspace",
    "env",
    "instances",
    "train",
    "rounds",
    "logprobs",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        prop::sample::select(vec![
            "user",
            "system",
            "assistant",
            "tool",
            "all",
            "auto",
            "none",
            "smollm2-135m@lib",
            "plan:m"
        ])
        .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(FIELDS), inner), 0..6).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

fn limits() -> RequestLimits {
    RequestLimits {
        max_n: 8,
        max_stop: 4,
        max_tools: 128,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn chat_requests_parse_or_fail_cleanly(v in json_value()) {
        let bytes = serde_json::to_vec(&v).unwrap();
        if let Ok(req) = parse_json::<ChatCompletionRequest>(&bytes) {
            let _ = req.validate(&limits());
        }
    }

    #[test]
    fn arbitrary_bodies_never_panic_the_parser(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_json::<ChatCompletionRequest>(&bytes);
    }

    #[test]
    fn model_names_split_back_into_their_parts(
        method in prop::option::of(prop::sample::select(vec!["direct", "iterresearch", "plan"])),
        model in "[a-z0-9._:/-]{1,20}",
        library in prop::option::of("[a-z0-9_.-]{1,12}"),
    ) {
        let name = format!(
            "{}{model}{}",
            method.map(|m| format!("{m}:")).unwrap_or_default(),
            library.as_ref().map(|l| format!("@{l}")).unwrap_or_default()
        );
        let parsed = crate::router::parse_model_name(&name);
        prop_assert_eq!(parsed.library, library.as_deref());
        if method.is_some() {
            prop_assert_eq!(parsed.method, method);
            prop_assert_eq!(parsed.model, model.as_str());
        } else {
            // A model id may itself start with a method's name and a colon; then it is read
            // as that method, which is the documented rule.
            let expected = crate::router::parse_model_name(&model);
            prop_assert_eq!(parsed.model, expected.model);
        }
    }

    #[test]
    fn any_model_name_parses(name in ".{0,40}") {
        let p = crate::router::parse_model_name(&name);
        prop_assert!(name.contains(p.model));
    }

    #[test]
    fn learner_replies_parse_or_fail_cleanly(reply in "(?s).{0,400}") {
        let _ = crate::learn::ops::parse(&reply);
        let _ = crate::learn::ops::parse_lessons(&reply);
        let _ = crate::learn::ops::strip_thinking(&reply);
    }

    #[test]
    fn operation_shaped_replies_parse_or_fail_cleanly(
        lines in prop::collection::vec(
            (prop::sample::select(vec!["ADD", "UPDATE", "DELETE", "NONE", "add", "- ADD", "1. UPDATE"]),
             prop::option::of("E?[0-9]{0,3}"),
             ".{0,40}"),
            0..8)
    ) {
        let reply: String = lines
            .iter()
            .map(|(op, id, text)| format!("{op} {} {text}\n", id.clone().unwrap_or_default()))
            .collect();
        let _ = crate::learn::ops::parse(&reply);
        let as_json = json!(lines.iter().map(|(op, id, text)| json!({"operation": op, "id": id, "content": text})).collect::<Vec<_>>());
        let _ = crate::learn::ops::parse(&as_json.to_string());
    }
}

/// Text that random strings never reach: brackets and operators nested tens of thousands deep,
/// with words between them. Each of these once overflowed a tokio worker's stack.
fn nested_text() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["(", "((", "[", "{", "-", "!", "\"", "(a OR ", "+("]),
        1usize..60_000,
        prop::sample::select(vec!["", ")", "units", " convert AND lesson", "1"]),
        0usize..60_000,
    )
        .prop_map(|(open, depth, middle, close)| {
            format!("{}{middle}{}", open.repeat(depth), ")".repeat(close))
        })
}

/// A chat request with a huge count of one thing: tools, messages, stop sequences, tags.
fn huge_counts() -> impl Strategy<Value = Value> {
    (prop::sample::select(vec!["tools", "messages", "stop", "logit_bias"]), 0usize..70_000).prop_map(
        |(field, n)| {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            body[field] = match field {
                "tools" => Value::Array(
                    (0..n)
                        .map(|i| json!({"type": "function", "function": {"name": format!("f{}", i % 1000)}}))
                        .collect(),
                ),
                "messages" => Value::Array(
                    (0..n.max(1)).map(|_| json!({"role": "user", "content": "x"})).collect(),
                ),
                "stop" => Value::Array((0..n).map(|i| json!(format!("s{i}"))).collect()),
                _ => Value::Object((0..n).map(|i| (i.to_string(), json!(1))).collect()),
            };
            body
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn deeply_nested_text_is_searched_without_recursion(q in nested_text()) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::experience::Store::open(dir.path(), Default::default()).unwrap();
        store.create("l").unwrap();
        store.add("l", "Units: convert every quantity first.", vec![]).unwrap();
        // On a thread with a small stack, as a tokio worker's: recursion per bracket would
        // overflow it long before these depths.
        let hits = std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(move || store.search("l", &Query::text(&q, 3)).map(|h| h.len()))
            .unwrap()
            .join()
            .expect("search overflowed a small stack");
        prop_assert!(hits.is_ok());
    }

    #[test]
    fn huge_counts_are_refused_or_served_quickly(body in huge_counts()) {
        let bytes = serde_json::to_vec(&body).unwrap();
        let t = std::time::Instant::now();
        if let Ok(req) = parse_json::<ChatCompletionRequest>(&bytes) {
            let _ = req.validate(&limits());
        }
        prop_assert!(t.elapsed() < std::time::Duration::from_secs(2), "{:?}", t.elapsed());
    }
}

#[test]
fn deeply_nested_expressions_are_refused_before_they_are_parsed() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for depth in [33, 1_000, 100_000] {
        let deep = format!("{}1{}", "(".repeat(depth), ")".repeat(depth));
        let out = rt.block_on(crate::methods::iterresearch::calculate_for_tests(&deep));
        assert!(out.starts_with("error:"), "{depth}: {out}");
    }
}
