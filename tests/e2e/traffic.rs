//! Learning from production traffic, end to end with the real model and a real server: a
//! library that records, completions served through chat (plain and streamed) and the
//! Responses API, feedback on them by the id each client saw, bad feedback refused, a learning
//! job from the traffic whose new experiences cite the completions and feedback they came
//! from, continuous learning started by feedback alone, and a purge.
//!
//! As in tests/learn.rs, the learner prompts are overridden (as a deployment may) with ones
//! the 135M model can follow: it repeats a given lesson. The attempts, their rewards, the
//! groups and the commit are the real pipeline.

use crate::common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::learning::{learner_prompts, FIRST_WORD};

/// The first `n` BBH boolean_expressions tasks as (question, answer).
fn bool_tasks(n: usize) -> Vec<(String, String)> {
    common::learning::bool_tasks(n)
        .into_iter()
        .map(|t| {
            (
                t["question"].as_str().unwrap().to_owned(),
                t["answer"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn call(method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    crate::common::call(method, url, body.as_ref()).await
}

async fn wait_job(url: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let (_, job) = call("GET", url, None).await;
        if job["status"] != "running" {
            return job;
        }
        assert!(Instant::now() < deadline, "job never finished: {job}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn feedback_on_served_answers_grows_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = learner_prompts(dir.path());
    let server = common::start_in(dir, None, &[("EXPERIENT_PROMPTS_DIR", &prompts)]);
    let url = |p: &str| server.url(p);

    let (s, _) = call(
        "POST",
        &url("/v1/libraries"),
        // Learned versions go live at once here (`promote: always`): this test is about
        // traffic and feedback; the gate has tests of its own.
        Some(json!({"name": "bool", "settings": {"record": true, "promote": "always"}})),
    )
    .await;
    assert_eq!(s, 201);
    let (s, _) = call(
        "POST",
        &url("/v1/libraries"),
        Some(json!({"name": "quiet"})),
    )
    .await;
    assert_eq!(s, 201);

    // Served completions, each with the id its client saw: chat, streamed chat, Responses.
    let tasks = bool_tasks(12);
    let mut ids = Vec::new();
    for (i, (q, _)) in tasks.iter().enumerate() {
        let messages = json!([{"role": "user", "content": q}]);
        let id = match i % 3 {
            0 => {
                let (s, v) = call("POST", &url("/v1/chat/completions"), Some(json!({"model": "smollm2-135m@bool", "messages": messages, "max_tokens": 6, "temperature": 0}))).await;
                assert_eq!(s, 200, "{v}");
                v["id"].as_str().unwrap().to_owned()
            }
            1 => {
                let chunks = common::stream_chunks(&server, json!({"model": "smollm2-135m@bool", "messages": messages, "max_tokens": 6, "temperature": 0})).await;
                chunks[0]["id"].as_str().unwrap().to_owned()
            }
            _ => {
                let (s, v) = call("POST", &url("/v1/responses"), Some(json!({"model": "smollm2-135m@bool", "input": q, "max_output_tokens": 6, "temperature": 0}))).await;
                assert_eq!(s, 200, "{v}");
                v["id"].as_str().unwrap().to_owned()
            }
        };
        ids.push(id);
    }
    // A library that does not record keeps nothing to give feedback on.
    let (_, v) = call("POST", &url("/v1/chat/completions"), Some(json!({"model": "smollm2-135m@quiet", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))).await;
    let (s, e) = call(
        "POST",
        &url("/v1/feedback"),
        Some(json!({"id": v["id"], "label": "good"})),
    )
    .await;
    assert_eq!((s, e["error"]["param"].as_str()), (404, Some("id")), "{e}");

    // Bad bodies are refused, naming the field.
    for (body, param) in [
        (json!({"id": ids[0]}), "score"),
        (json!({"id": ids[0], "score": 1.5}), "score"),
        (json!({"id": ids[0], "label": "meh"}), "label"),
        (json!({"id": ids[0], "label": "good", "score": 1}), "label"),
        (json!({"id": ids[0], "label": "good", "stars": 5}), "stars"),
        (json!({"label": "good"}), "id"),
    ] {
        let (s, e) = call("POST", &url("/v1/feedback"), Some(body.clone())).await;
        assert_eq!(
            (s, e["error"]["param"].as_str()),
            (400, Some(param)),
            "{body}: {e}"
        );
    }

    // Feedback with the right answer, for every served completion.
    let mut feedback_ids = Vec::new();
    for (id, (_, answer)) in ids.iter().zip(&tasks) {
        let (s, fb) = call(
            "POST",
            &url("/v1/feedback"),
            Some(json!({"id": id, "label": "bad", "comment": "check it", "expected": answer})),
        )
        .await;
        assert_eq!(s, 201, "{fb}");
        assert_eq!(fb["response_id"], id.as_str());
        assert_eq!(fb["library"], "bool");
        assert_eq!(fb["score"], 0.0);
        feedback_ids.push(fb["id"].as_str().unwrap().to_owned());
    }
    let (_, list) = call("GET", &url("/v1/feedback?library=bool"), None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 12);
    let (_, few) = call("GET", &url("/v1/feedback?library=bool&limit=2"), None).await;
    assert_eq!(few["data"].as_array().unwrap().len(), 2);
    for (query, param) in [
        ("since=yesterday", "since"),
        ("limit=lots", "limit"),
        ("limit=0", "limit"),
    ] {
        let (s, e) = call("GET", &url(&format!("/v1/feedback?{query}")), None).await;
        assert_eq!(
            (s, e["error"]["param"].as_str()),
            (400, Some(param)),
            "{query}: {e}"
        );
    }

    // Learning from the traffic: the ordinary loop, with the expected answers as references,
    // on eight of the twelve (two steps: eight groups, all alike about once in 10^5 jobs).
    let (s, job) = call(
        "POST",
        &url("/v1/libraries/bool/learn"),
        Some(json!({
            "source": "traffic", "limit": 8, "epochs": 1, "batch_size": 4, "group_size": 4,
            "temperature": 1.0, "max_tokens": 6, "learner_max_tokens": 40,
            "verifier": FIRST_WORD, "concurrency": 4,
        })),
    )
    .await;
    assert_eq!(s, 202, "{job}");
    let job = wait_job(&url(&format!("/v1/jobs/{}", job["id"].as_str().unwrap()))).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let (_, lib) = call("GET", &url("/v1/libraries/bool/experiences"), None).await;
    let exps = lib["data"].as_array().unwrap();
    assert!(!exps.is_empty(), "{job}");
    // Every learned experience cites served completions and the feedback on them.
    for e in exps {
        let sources: Vec<&str> = e["provenance"]["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert!(!sources.is_empty(), "{e}");
        assert!(
            sources.iter().any(|s| ids.iter().any(|i| i == s)),
            "{sources:?}"
        );
        assert!(
            sources.iter().any(|s| feedback_ids.iter().any(|f| f == s)),
            "{sources:?}"
        );
    }

    // Continuous mode: feedback alone starts a job once `after` new pieces have arrived.
    let settings = json!({"record": true, "promote": "always", "auto_learn": {"after": 2}});
    let (s, v) = call("PATCH", &url("/v1/libraries/bool"), Some(settings)).await;
    assert_eq!(s, 200, "{v}");
    for id in &ids[..2] {
        let (s, _) = call(
            "POST",
            &url("/v1/feedback"),
            Some(json!({"id": id, "score": 1})),
        )
        .await;
        assert_eq!(s, 201);
    }
    let (_, jobs) = call("GET", &url("/v1/jobs"), None).await;
    let auto = jobs["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] != job["id"])
        .cloned();
    let auto = auto.unwrap_or_else(|| panic!("no automatic job: {jobs}"));
    assert_eq!(auto["library"], "bool", "{auto}");
    // It learns in the background; cancelling it leaves the library as it was.
    call(
        "DELETE",
        &url(&format!("/v1/jobs/{}", auto["id"].as_str().unwrap())),
        None,
    )
    .await;

    // Offline, from the command line, with the server stopped: evaluate on the traffic whose
    // feedback gave the right answer, with and without the library, then learn from it.
    let dir = server.kill(libc::SIGTERM);
    let exp = dir.path().join("experience");
    let cli =
        |args: &[&str]| crate::common::cli_json(args, &exp, &[("EXPERIENT_PROMPTS_DIR", &prompts)]);
    let report = cli(&[
        "eval",
        "--library",
        "bool",
        "--from-traffic",
        "--limit",
        "6",
        "--max-tokens",
        "6",
    ]);
    let arms = report["arms"].as_array().unwrap();
    assert_eq!(arms.len(), 2, "{report}");
    assert!(arms.iter().all(|a| a["tasks"] == 6), "{report}");
    assert_eq!(report["dataset"], "traffic:bool");
    let learned = cli(&[
        "learn",
        "--library",
        "bool",
        "--from-traffic",
        "--limit",
        "4",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--group-size",
        "2",
        "--max-tokens",
        "6",
        "--learner-max-tokens",
        "40",
        "--verifier",
        FIRST_WORD,
    ]);
    assert_eq!(learned["steps"].as_array().unwrap().len(), 1, "{learned}");
    let server = common::start_in(dir, None, &[("EXPERIENT_PROMPTS_DIR", &prompts)]);
    let url = |p: &str| server.url(p);

    // Purge: the records and feedback are gone, and so is feedback on them.
    let (s, _) = call("DELETE", &url("/v1/libraries/bool/traffic"), None).await;
    assert_eq!(s, 200);
    let (_, list) = call("GET", &url("/v1/feedback?library=bool"), None).await;
    assert!(list["data"].as_array().unwrap().is_empty(), "{list}");
    let (s, _) = call(
        "POST",
        &url("/v1/feedback"),
        Some(json!({"id": ids[0], "label": "good"})),
    )
    .await;
    assert_eq!(s, 404);
}
