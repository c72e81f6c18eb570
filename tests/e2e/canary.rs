//! Live trials and feedback credit (issue 42), in-process on the scripted backend: a canary
//! serves its candidate to a share of a library's traffic, feedback on the answers decides
//! it (promoted or rolled back, with the decision recorded), a request may pin a version, and
//! feedback credits the experiences that were in the prompt, which `skip_harmful` then acts
//! on. The scripted model answers from the prior it is given, so which arm is better is known
//! by construction.

use std::collections::BTreeMap;

use experient::api::auth::Keys;
use experient::backend::scripted::{Script, Scripted};
use experient::config::Config;
use serde_json::{json, Value};

use crate::gate::{call, job, model};
use crate::inprocess::{serve_with, Server};

/// Feedback is rate-limited per key; these tests rate many answers in a second.
fn config() -> Config {
    let mut c = Config::default();
    c.traffic.feedback_per_minute = 100_000;
    c
}

/// One chat answer from `model` for `question` in conversation `user`, rated 1 when it is
/// `right` and 0 otherwise; returns the response's `experient` object.
async fn ask_and_rate(s: &Server, model: &str, question: &str, user: &str, right: &str) -> Value {
    let (st, v) = call(
        s,
        "POST",
        "/v1/chat/completions",
        Some(
            json!({"model": model, "temperature": 0, "max_tokens": 4, "user": user,
                    "messages": [{"role": "user", "content": question}]}),
        ),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    let score = if answer == right { 1.0 } else { 0.0 };
    let (st, fb) = call(
        s,
        "POST",
        "/v1/feedback",
        Some(json!({"id": v["id"], "score": score})),
    )
    .await;
    assert_eq!(st, 201, "{fb}");
    v["experient"].clone()
}

/// Asks question `i` for each i until the library's trial has ended, and returns how many
/// answers each arm served.
async fn run_trial(
    s: &Server,
    library: &str,
    question: impl Fn(usize) -> String,
    right: &str,
) -> BTreeMap<String, usize> {
    let mut served = BTreeMap::new();
    for i in 0..400 {
        let e = ask_and_rate(
            s,
            &format!("m@{library}"),
            &question(i),
            &format!("user-{i}"),
            right,
        )
        .await;
        let arm = e["canary"]["arm"]
            .as_str()
            .expect("a running trial")
            .to_owned();
        *served.entry(arm).or_insert(0) += 1;
        let (_, t) = call(s, "GET", &format!("/v1/libraries/{library}/canary"), None).await;
        if t["current"].is_null() {
            return served;
        }
    }
    panic!("the trial never decided: {served:?}");
}

#[tokio::test]
async fn a_canary_of_pending_proposals_that_feedback_prefers_is_promoted() {
    const LESSON: &str = "Conjunctions: answer True when both sides hold.";
    let s = serve_with(model("False", LESSON), Keys::default(), config()).await;
    let (st, v) = call(
        &s,
        "POST",
        "/v1/libraries",
        Some(json!({"name": "bool", "settings": {"record": true, "promote": "review"}})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let learned = job(&s, "bool").await;
    assert!(
        learned["result"]["steps"][0]["version"].is_null(),
        "{learned}"
    );
    let (_, pending) = call(&s, "GET", "/v1/libraries/bool/proposals", None).await;
    let ids: Vec<Value> = pending["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].clone())
        .collect();
    assert!(!ids.is_empty(), "{pending}");

    // Specs no trial could run with are refused, naming the field.
    for (body, status, param) in [
        (json!({"proposals": ids, "share": 0.7}), 400, "share"),
        (json!({"share": 0.5}), 400, "version"),
        (
            json!({"proposals": ids, "share": 0.5, "min_samples": 0}),
            400,
            "min_samples",
        ),
        (
            json!({"proposals": ["prop_nope"], "share": 0.5}),
            404,
            "proposals",
        ),
    ] {
        let (st, v) = call(&s, "POST", "/v1/libraries/bool/canary", Some(body)).await;
        assert_eq!(
            (st, v["error"]["param"].as_str()),
            (status, Some(param)),
            "{v}"
        );
    }
    let spec = json!({"proposals": ids, "share": 0.5, "sticky": "conversation", "min_samples": 6});
    let (st, c) = call(&s, "POST", "/v1/libraries/bool/canary", Some(spec.clone())).await;
    assert_eq!(st, 201, "{c}");
    assert_eq!(
        (c["status"].as_str(), c["base"].as_u64()),
        (Some("running"), Some(0))
    );
    let (st, v) = call(&s, "POST", "/v1/libraries/bool/canary", Some(spec)).await;
    assert_eq!(st, 409, "one trial at a time: {v}");

    let served = run_trial(&s, "bool", |i| format!("True and ( {i} < 99 ) is"), "True").await;
    assert!(
        served["control"] >= 6 && served["candidate"] >= 6,
        "{served:?}"
    );
    let (_, t) = call(&s, "GET", "/v1/libraries/bool/canary", None).await;
    let ended = &t["past"][0];
    assert_eq!(ended["status"], "promoted", "{t}");
    assert!(
        ended["decision"].as_str().unwrap().starts_with("promoted"),
        "{t}"
    );
    assert_eq!(
        (
            ended["trial"]["mean"].as_f64(),
            ended["control"]["mean"].as_f64()
        ),
        (Some(1.0), Some(0.0))
    );
    // The proposals are live as the version the trial committed, which records the trial.
    let version = ended["promoted_as"].as_u64().expect("a committed version");
    let (_, lib) = call(&s, "GET", "/v1/libraries/bool", None).await;
    assert_eq!(lib["version"], version, "{lib}");
    let (_, v) = call(
        &s,
        "GET",
        &format!("/v1/libraries/bool/versions/{version}"),
        None,
    )
    .await;
    assert_eq!(v["gate"]["canary"]["id"], ended["id"], "{v}");
    let (_, left) = call(&s, "GET", "/v1/libraries/bool/proposals", None).await;
    assert_eq!(left["data"], json!([]), "{left}");
    // Everyone now gets the lesson.
    let e = ask_and_rate(&s, "m@bool", "True and ( 500 < 999 ) is", "late", "True").await;
    assert_eq!(e["version"], version, "{e}");
    assert!(e.get("canary").is_none(), "{e}");
    s.stop().await;
}

/// A model that answers "80" when the percentages lesson is in its prompt and "7" otherwise.
fn percentages_model() -> std::sync::Arc<Scripted> {
    Scripted::new(|r| {
        let system = r.messages.first().map(|m| m.content.as_str()).unwrap_or("");
        Script::words(if system.contains("Percentages:") {
            "80"
        } else {
            "7"
        })
    })
}

#[tokio::test]
async fn a_worse_version_on_trial_is_rolled_back_and_a_request_may_pin_one() {
    // "math" is at version 2 (units, then percentages); version 1 lacks the lesson that the
    // model needs, so trying it again must fail.
    let s = serve_with(percentages_model(), Keys::default(), config()).await;
    let (st, v) = call(
        &s,
        "PATCH",
        "/v1/libraries/math",
        Some(json!({"record": true})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let q = |i: usize| format!("Percentages and units: a discount of 20% on 100 units, case {i}?");

    // A pinned version serves whatever that version held, and says so.
    let pinned = |version: Value| {
        json!({"model": "m@math", "temperature": 0, "experient": {"version": version},
               "messages": [{"role": "user", "content": q(0)}]})
    };
    let (st, v) = call(&s, "POST", "/v1/chat/completions", Some(pinned(json!(1)))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (
            v["experient"]["version"].as_u64(),
            v["choices"][0]["message"]["content"].as_str()
        ),
        (Some(1), Some("7"))
    );
    let (st, v) = call(&s, "POST", "/v1/chat/completions", Some(pinned(json!(9)))).await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (404, Some("experient.version")),
        "{v}"
    );
    let (st, v) = call(
        &s,
        "POST",
        "/v1/chat/completions",
        Some(json!({"model": "m", "experient": {"version": 1},
                    "messages": [{"role": "user", "content": "hi"}]})),
    )
    .await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("experient.version")),
        "{v}"
    );

    let (st, v) = call(
        &s,
        "POST",
        "/v1/libraries/math/canary",
        Some(json!({"version": 2, "share": 0.5})),
    )
    .await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("version")),
        "the live version is no candidate: {v}"
    );
    let (st, c) = call(
        &s,
        "POST",
        "/v1/libraries/math/canary",
        Some(json!({"version": 1, "share": 0.5, "sticky": "conversation", "min_samples": 5})),
    )
    .await;
    assert_eq!(st, 201, "{c}");
    let served = run_trial(&s, "math", q, "80").await;
    assert!(
        served["control"] >= 5 && served["candidate"] >= 5,
        "{served:?}"
    );
    let (_, t) = call(&s, "GET", "/v1/libraries/math/canary", None).await;
    assert_eq!(t["past"][0]["status"], "rolled_back", "{t}");
    assert!(t["past"][0].get("promoted_as").is_none(), "{t}");
    let (_, lib) = call(&s, "GET", "/v1/libraries/math", None).await;
    assert_eq!(lib["version"], 2, "the live version stays: {lib}");

    // Every rating credited the experiences its answer was given: the percentages lesson
    // helped each time it was served, the units lesson only beside it.
    let (_, exps) = call(&s, "GET", "/v1/libraries/math/experiences", None).await;
    let by_text = |prefix: &str| {
        exps["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["text"].as_str().unwrap().starts_with(prefix))
            .cloned()
            .unwrap()
    };
    let (units, pct) = (by_text("Units:"), by_text("Percentages:"));
    assert_eq!(pct["harmful"], 0, "{pct}");
    assert_eq!(
        pct["helpful"].as_u64(),
        Some(served["control"] as u64),
        "{pct}"
    );
    assert_eq!(
        units["harmful"].as_u64(),
        Some(served["candidate"] as u64),
        "{units}"
    );
    assert_eq!(units["credit"]["helpful"], units["helpful"], "{units}");
    // Provenance shows the credit per version that served it.
    let (_, p) = call(
        &s,
        "GET",
        &format!(
            "/v1/libraries/math/experiences/{}/provenance",
            units["id"].as_str().unwrap()
        ),
        None,
    )
    .await;
    assert_eq!(
        p["credit"]["1"]["harmful"].as_u64(),
        Some(served["candidate"] as u64),
        "{p}"
    );
    s.stop().await;
}

#[tokio::test]
async fn an_experience_that_feedback_blames_is_skipped_until_it_is_rewritten() {
    // The model goes wrong whenever the percentages lesson is in its prompt.
    let backend = Scripted::new(|r| {
        let system = r.messages.first().map(|m| m.content.as_str()).unwrap_or("");
        Script::words(if system.contains("Percentages:") {
            "wrong"
        } else {
            "right"
        })
    });
    let s = serve_with(backend, Keys::default(), config()).await;
    let (st, v) = call(
        &s,
        "PATCH",
        "/v1/libraries/math",
        Some(json!({"record": true, "inject": "top_k", "top_k": 1})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let units = "Convert every quantity to one unit: 3 feet and 12 inches";
    let pct = "A discount of 30% leaves what share of the price?";
    for i in 0..4 {
        ask_and_rate(&s, "m@math", units, &format!("u{i}"), "right").await;
        let e = ask_and_rate(&s, "m@math", pct, &format!("p{i}"), "right").await;
        assert_eq!(e["experiences"].as_array().unwrap().len(), 1, "{e}");
    }
    let (_, exps) = call(&s, "GET", "/v1/libraries/math/experiences", None).await;
    let blamed = exps["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["text"].as_str().unwrap().starts_with("Percentages:"))
        .cloned()
        .unwrap();
    assert_eq!(
        (blamed["helpful"].as_u64(), blamed["harmful"].as_u64()),
        (Some(0), Some(4)),
        "{blamed}"
    );

    let (st, v) = call(
        &s,
        "PATCH",
        "/v1/libraries/math",
        Some(
            json!({"record": true, "inject": "top_k", "top_k": 1, "skip_harmful": {"ratio": 1.5}}),
        ),
    )
    .await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("skip_harmful.ratio")),
        "{v}"
    );
    let (st, v) = call(
        &s,
        "PATCH",
        "/v1/libraries/math",
        Some(json!({"record": true, "inject": "top_k", "top_k": 1, "skip_harmful": {"ratio": 0.5, "min_votes": 3}})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let e = ask_and_rate(&s, "m@math", pct, "after", "right").await;
    assert_eq!(
        e["experiences"],
        json!([]),
        "the blamed lesson is no longer served: {e}"
    );
    let e = ask_and_rate(&s, "m@math", units, "after", "right").await;
    assert_eq!(e["experiences"].as_array().unwrap().len(), 1, "{e}");

    // Rewritten, it starts clean and is served again; its old votes stay on record.
    let id = blamed["id"].as_str().unwrap();
    let (st, v) = call(
        &s,
        "PATCH",
        &format!("/v1/libraries/math/experiences/{id}"),
        Some(json!({"text": "Percentages: a discount of p% leaves (100-p)% of the price."})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (v["harmful"].as_u64(), v["credit"]["harmful"].as_u64()),
        (Some(4), Some(0)),
        "{v}"
    );
    let e = ask_and_rate(&s, "m@math", pct, "rewritten", "right").await;
    assert_eq!(e["experiences"], json!([id]), "{e}");
    s.stop().await;
}
