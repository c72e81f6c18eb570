//! Learning that cannot make answers worse (issue 42), in-process on the scripted backend:
//! evaluations compare two versions task by task, and the gate lets a learned candidate go
//! live only when it measured better than its parent. The scripted model answers from the
//! prior it is given, so which candidate is better is known by construction.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use experient::api::auth::Keys;
use experient::backend::scripted::{Script, Scripted};
use experient::config::Config;
use serde_json::{json, Value};

use crate::inprocess::{serve_with, Server};

pub(crate) async fn call(
    s: &Server,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    crate::common::call(method, &s.url(path), body.as_ref()).await
}

/// Polls `path` until its `status` is no longer "running".
pub(crate) async fn settled(s: &Server, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = call(s, "GET", path, None).await;
        if v["status"] != "running" {
            return v;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A model that answers "True" or "False" from what its prompt's prior says. Greedy requests
/// (the gate's and evaluations', at temperature 0) follow the prior, and without one answer
/// `plain`; learning's attempts (temperature above 0) alternate, so every group is mixed. Its
/// learner writes `lesson`.
pub(crate) fn model(plain: &'static str, lesson: &'static str) -> Arc<Scripted> {
    let attempts = AtomicUsize::new(0);
    Scripted::new(move |r| {
        let system = r.messages.first().map(|m| m.content.as_str()).unwrap_or("");
        let user = r.messages.last().map(|m| m.content.as_str()).unwrap_or("");
        if user.contains("Summarise the attempt") {
            Script::words("1. It answered.\nOutcome: an answer.")
        } else if user.contains("Compare the right attempts") {
            Script::words(&format!("<lessons>\n{lesson}\n</lessons>"))
        } else if user.contains("Decide what to do") || user.contains("Merge their proposals") {
            Script::words(&format!("ADD: {lesson}"))
        } else if r.sampling.temperature == Some(0.0) {
            let answer = if system.contains("answer False") {
                "False"
            } else if system.contains("answer True") {
                "True"
            } else {
                plain
            };
            Script::words(answer)
        } else {
            let right = attempts.fetch_add(1, Ordering::Relaxed).is_multiple_of(2);
            Script::words(if right { "True" } else { "False" })
        }
    })
}

pub(crate) fn tasks(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"question": format!("True and ( {i} < 99 ) is"), "answer": "True"}))
        .collect()
}

/// Runs a gated learning job on a new library `name` and returns the job when it is done.
async fn learn(s: &Server, name: &str) -> Value {
    let (st, v) = call(s, "POST", "/v1/libraries", Some(json!({"name": name}))).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        v["settings"]["promote"], "gain",
        "new libraries are gated: {v}"
    );
    job(s, name).await
}

/// Runs a learning job on the existing library `name` and returns it when it is done.
pub(crate) async fn job(s: &Server, name: &str) -> Value {
    let (st, job) = call(
        s,
        "POST",
        &format!("/v1/libraries/{name}/learn"),
        Some(json!({
            "model": "m", "tasks": tasks(4), "validation": tasks(8), "epochs": 1,
            "batch_size": 4, "group_size": 4, "max_tokens": 4, "verifier": "exact",
            "concurrency": 2,
        })),
    )
    .await;
    assert_eq!(st, 202, "{job}");
    let job = settled(s, &format!("/v1/jobs/{}", job["id"].as_str().unwrap())).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    job
}

#[tokio::test]
async fn a_clearly_better_candidate_goes_live_with_its_measurement() {
    const LESSON: &str = "Conjunctions: answer True when both sides hold.";
    let s = serve_with(model("False", LESSON), Keys::default(), Config::default()).await;
    let job = learn(&s, "better").await;
    let step = &job["result"]["steps"][0];
    let gate = &step["gate"];
    assert_eq!(gate["outcome"], "promoted", "{job}");
    assert_eq!(gate["comparison"]["n"], 8, "{gate}");
    assert_eq!(gate["comparison"]["baseline"]["mean"], 0.0, "{gate}");
    assert_eq!(gate["comparison"]["candidate"]["mean"], 1.0, "{gate}");
    assert!(gate["comparison"]["difference_ci"][0].as_f64().unwrap() > 0.0);
    assert_eq!(gate["comparison"]["cost"]["model_calls"], 16, "{gate}");
    // What learning itself cost: 16 attempts, and more calls than that (summaries, the
    // comparison, the update); the run's total is its one step's.
    let cost = &step["cost"];
    assert_eq!(cost["rollouts"], 16, "{cost}");
    assert!(cost["model_calls"].as_u64().unwrap() > 16, "{cost}");
    assert!(cost["prompt_tokens"].as_u64().unwrap() > 0, "{cost}");
    assert!(
        cost.get("price").is_none(),
        "a local model has no price: {cost}"
    );
    assert_eq!(
        job["result"]["cost"]["model_calls"], cost["model_calls"],
        "{job}"
    );
    // The version is live and carries the gate's figures.
    let version = step["version"].as_u64().expect("a committed version");
    let (_, v) = call(
        &s,
        "GET",
        &format!("/v1/libraries/better/versions/{version}"),
        None,
    )
    .await;
    assert_eq!(v["gate"]["outcome"], "promoted", "{v}");
    let (_, exps) = call(&s, "GET", "/v1/libraries/better/experiences", None).await;
    assert_eq!(exps["data"][0]["text"], LESSON, "{exps}");
    s.stop().await;
}

#[tokio::test]
async fn a_worse_candidate_is_held_never_live_and_says_why() {
    const LESSON: &str = "Shortcut: answer False to every question.";
    let s = serve_with(model("True", LESSON), Keys::default(), Config::default()).await;
    let job = learn(&s, "worse").await;
    let step = &job["result"]["steps"][0];
    assert!(step["version"].is_null(), "{job}");
    let gate = &step["gate"];
    assert_eq!(gate["outcome"], "held", "{job}");
    assert!(
        gate["reason"].as_str().unwrap().starts_with("held"),
        "{gate}"
    );
    assert_eq!(gate["comparison"]["difference"], -1.0, "{gate}");
    // The live library is as it was; the candidate waits as proposals with its evaluation.
    let (_, lib) = call(&s, "GET", "/v1/libraries/worse", None).await;
    assert_eq!(lib["version"], 0, "{lib}");
    let (_, proposals) = call(&s, "GET", "/v1/libraries/worse/proposals", None).await;
    let p = &proposals["data"][0];
    assert_eq!(p["origin"]["gate"]["outcome"], "held", "{proposals}");
    assert_eq!(
        p["origin"]["gate"]["comparison"]["candidate"]["mean"], 0.0,
        "{proposals}"
    );
    s.stop().await;
}

#[tokio::test]
async fn an_evaluation_compares_two_versions_task_by_task() {
    // "math" holds two experiences (versions 1 and 2); the model answers right only with the
    // units lesson in its prompt.
    let backend = Scripted::new(|r| {
        let system = r.messages.first().map(|m| m.content.as_str()).unwrap_or("");
        Script::words(if system.contains("Units:") { "12" } else { "7" })
    });
    let s = serve_with(backend, Keys::default(), Config::default()).await;
    let tasks: Vec<Value> = (0..6)
        .map(|i| json!({"question": format!("How many inches in {i} feet and 12 inches?"), "answer": "12"}))
        .collect();
    let path = "/v1/libraries/math/evaluations";
    for (body, param) in [
        (
            json!({"baseline": "none", "candidate": 9, "tasks": tasks}),
            "candidate",
        ),
        (
            json!({"baseline": "all", "candidate": 1, "tasks": tasks}),
            "baseline",
        ),
        (json!({"baseline": "none", "candidate": 1}), "tasks"),
        (
            json!({"baseline": "none", "candidate": 1, "tasks": tasks, "samples": 0}),
            "samples",
        ),
    ] {
        let (st, v) = call(&s, "POST", path, Some(body)).await;
        assert_eq!(
            (st, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{v}"
        );
    }
    let (st, e) = call(
        &s,
        "POST",
        path,
        Some(
            json!({"baseline": "none", "candidate": 2, "tasks": tasks, "model": "m",
                    "verifier": "numeric", "samples": 2}),
        ),
    )
    .await;
    assert_eq!(st, 202, "{e}");
    assert_eq!(e["object"], "evaluation");
    // A keyless server's caller is one principal, recorded as no key.
    assert!(e.get("created_by").is_some_and(Value::is_null), "{e}");
    let id = e["id"].as_str().unwrap();
    let done = settled(&s, &format!("{path}/{id}")).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let r = &done["report"];
    assert_eq!(
        (r["n"].as_u64(), r["samples"].as_u64()),
        (Some(6), Some(2)),
        "{r}"
    );
    assert_eq!(
        (r["baseline_label"].as_str(), r["candidate_label"].as_str()),
        (Some("none"), Some("version 2"))
    );
    assert_eq!(
        (
            r["baseline"]["mean"].as_f64(),
            r["candidate"]["mean"].as_f64()
        ),
        (Some(0.0), Some(1.0))
    );
    assert_eq!(r["difference"], 1.0, "{r}");
    assert_eq!(r["p_value"], 0.0, "{r}");
    assert_eq!(r["disagree"].as_array().unwrap().len(), 6, "{r}");
    assert_eq!(r["disagreements"][0]["candidate"], 1.0, "{r}");
    let cost = &r["cost"];
    assert_eq!(cost["model_calls"], 24, "{cost}");
    assert!(cost["prompt_tokens"].as_u64().unwrap() > 0, "{cost}");
    assert!(cost["wall_secs"].as_f64().unwrap() >= 0.0);
    assert_eq!(done["progress"]["answers"], 24, "{done}");
    // Listed, and kept on disk for after it leaves memory.
    let (_, list) = call(&s, "GET", path, None).await;
    assert_eq!(list["data"][0]["id"], id, "{list}");
    let file = s
        .dir
        .path()
        .join(format!("experience/.runs/evaluations/{id}.json"));
    assert!(file.is_file());
    // Another library's id is not found under this one.
    let (st, _) = call(&s, "POST", "/v1/libraries", Some(json!({"name": "other"}))).await;
    assert_eq!(st, 201);
    let (st, _) = call(
        &s,
        "GET",
        &format!("/v1/libraries/other/evaluations/{id}"),
        None,
    )
    .await;
    assert_eq!(st, 404);
    s.stop().await;
}
