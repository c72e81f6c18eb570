//! Training-Free GRPO end to end with the real embedded model: a learning job over HTTP that
//! commits a library version, the run directory that explains it, cancellation, errors, and a
//! resumed CLI run.
//!
//! The embedded 135M model cannot write lessons or operations in the asked-for form, so the
//! HTTP test overrides four learner prompts (through `EXPERIENT_PROMPTS_DIR`, as a deployment
//! would) with ones that ask it to repeat a given lesson, which it can. Everything else is the real pipeline: sampled
//! attempts, rewards from the verifier, the homogeneous-group skip, summaries, parsing,
//! checking, consolidation and the commit.

use crate::common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::learning::{bool_tasks as tasks, learner_prompts, FIRST_WORD};

async fn poll(http: &reqwest::Client, url: &str, until: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let job: Value = http.get(url).send().await.unwrap().json().await.unwrap();
        if until(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "job never finished: {job}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A GET's JSON body.
async fn get(http: &reqwest::Client, url: &str) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// Starts a learning job, which must be accepted, and returns its id.
async fn start(http: &reqwest::Client, url: &str, body: Value) -> String {
    let r = http.post(url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 202);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_learning_job_commits_a_version_that_explains_itself() {
    let dir = tempfile::tempdir().unwrap();
    let prompts_dir = learner_prompts(dir.path());
    let server = common::start_in(dir, None, &[("EXPERIENT_PROMPTS_DIR", &prompts_dir)]);
    let http = reqwest::Client::new();
    // What learning proposes goes live at once here (`promote: always`): this test is about
    // the learning loop; the gate has tests of its own.
    let r = http
        .post(server.url("/v1/libraries"))
        .json(&json!({"name": "bool", "settings": {"promote": "always"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // Bad requests are refused before anything runs.
    let r = http
        .post(server.url("/v1/libraries/bool/learn"))
        .json(&json!({"epochs": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "tasks", "{e}");
    let r = http
        .post(server.url("/v1/libraries/bool/learn"))
        .json(&json!({"tasks": tasks(2), "group_size": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .post(server.url("/v1/libraries/bool/learn"))
        .json(&json!({"tasks": tasks(2), "model": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        http.get(server.url("/v1/jobs/job_x"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // Two steps of four tasks, four attempts each: a group's four attempts are alike about one
    // time in four, so some group is mixed in all but about one job in 10^5.
    let r = http
        .post(server.url("/v1/libraries/bool/learn"))
        .json(&json!({
            "tasks": tasks(8), "epochs": 1, "batch_size": 4, "group_size": 4,
            "temperature": 1.0, "max_tokens": 6, "learner_max_tokens": 40,
            "verifier": FIRST_WORD, "concurrency": 4, "tags": ["bbh"],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    assert_eq!(job["object"], "learn.job");
    assert_eq!(job["status"], "running");
    let id = job["id"].as_str().unwrap().to_owned();

    // One library learns in one job at a time.
    let r = http
        .post(server.url("/v1/libraries/bool/learn"))
        .json(&json!({"tasks": tasks(2)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);

    let job = poll(&http, &server.url(&format!("/v1/jobs/{id}")), |j| {
        j["status"] != "running"
    })
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["progress"]["rollouts_done"], 32);
    let steps = job["result"]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(
        steps
            .iter()
            .map(|s| s["rollouts"].as_u64().unwrap())
            .sum::<u64>(),
        32
    );
    let committed: Vec<&Value> = steps.iter().filter(|s| !s["version"].is_null()).collect();
    assert!(!committed.is_empty(), "no step changed the library: {job}");

    // The library holds what the steps say they added, with provenance.
    let lib: Value = get(&http, &server.url("/v1/libraries/bool/experiences")).await;
    let exps = lib["data"].as_array().unwrap();
    assert!(!exps.is_empty());
    let run = job["run"].as_str().unwrap();
    for e in exps {
        assert_eq!(e["source"], "learned");
        assert_eq!(e["provenance"]["run"], run);
        assert_eq!(e["tags"], json!(["bbh"]));
        assert!(
            e["text"].as_str().unwrap().contains("innermost brackets"),
            "{e}"
        );
    }
    let versions: Value = get(&http, &server.url("/v1/libraries/bool/versions")).await;
    let messages: Vec<&str> = versions["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["message"].as_str().unwrap())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with(&format!("learn run {run} step "))),
        "{messages:?}"
    );

    // The run directory records why: attempts, groups, consolidation, results, a picture.
    let run_dir = std::path::PathBuf::from(job["run_dir"].as_str().unwrap());
    let step = committed[0]["step"].as_u64().unwrap();
    let step_dir = run_dir.join(format!("step-{step:04}"));
    let rollouts = std::fs::read_to_string(step_dir.join("rollouts.jsonl")).unwrap();
    assert_eq!(rollouts.lines().count(), 16);
    let groups: Value =
        serde_json::from_str(&std::fs::read_to_string(step_dir.join("groups.json")).unwrap())
            .unwrap();
    let g = &groups[0];
    let rewards: Vec<f64> = g["rewards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_f64().unwrap())
        .collect();
    assert!(
        rewards.contains(&1.0) && rewards.contains(&0.0),
        "only mixed groups are compared"
    );
    assert_eq!(g["summaries"].as_array().unwrap().len(), 4);
    // The learner's replies were decoded under their grammars, and each one was read.
    let replies = &committed[0]["replies"];
    assert_eq!(replies["constrained"], true, "{replies}");
    assert!(
        replies["comparison"]["calls"].as_u64().unwrap() >= 1,
        "{replies}"
    );
    assert!(
        replies["operations"]["calls"].as_u64().unwrap() >= 1,
        "{replies}"
    );
    assert_eq!(replies["comparison"]["unreadable"], 0, "{replies}");
    assert_eq!(replies["operations"]["unreadable"], 0, "{replies}");
    assert!(std::fs::read_to_string(step_dir.join("consolidation.json"))
        .unwrap()
        .contains("\"result\""));
    assert!(run_dir.join("summary.json").is_file());
    let svg = std::fs::read_to_string(run_dir.join("progress.svg")).unwrap();
    assert!(svg.starts_with("<svg"));

    // A long job can be cancelled; the library keeps what was committed before.
    let before = lib["data"].as_array().unwrap().len();
    let id = start(
        &http,
        &server.url("/v1/libraries/bool/learn"),
        json!({"tasks": tasks(40), "epochs": 3, "max_tokens": 64}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let job: Value = http
        .delete(server.url(&format!("/v1/jobs/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["status"], "cancelled");
    let list: Value = get(&http, &server.url("/v1/jobs")).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    let after: Value = get(&http, &server.url("/v1/libraries/bool")).await;
    assert_eq!(after["experiences"].as_u64().unwrap() as usize, before);

    // The server still answers chat after all that.
    let health = http.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

/// A run stopped after a step's commit but before its record resumes without learning that
/// step twice, and `--resume` finishes the rest.
#[test]
fn a_cli_run_resumes_where_it_stopped() {
    let root = env!("CARGO_MANIFEST_DIR");
    let tmp = tempfile::tempdir().unwrap();
    let exp = tmp.path().join("experience");
    let learn = |extra: &[&str]| {
        let fixed = ["--max-tokens", "4", "--learner-max-tokens", "24"];
        let args: Vec<&str> = ["learn"]
            .iter()
            .chain(extra)
            .chain(&fixed)
            .copied()
            .collect();
        crate::common::cli_json(&args, &exp, &[])
    };
    let first = learn(&[
        "--library",
        "b",
        "--dataset",
        &format!("{root}/tests/data/boolean_expressions.json"),
        "--limit",
        "4",
        "--batch-size",
        "2",
        "--epochs",
        "1",
        "--group-size",
        "2",
        "--validation",
        "2",
    ]);
    let steps = first["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    assert!(first["baseline_validation"].is_number());
    assert!(steps[1]["validation"]["accuracy"].is_number());
    let run_dir = std::path::PathBuf::from(first["dir"].as_str().unwrap());
    let version = first["version"].as_u64().unwrap();

    // Forget the last step's record, as a crash right after its commit would.
    std::fs::remove_file(run_dir.join("step-0002/result.json")).unwrap();
    let resumed = learn(&["--resume", run_dir.to_str().unwrap()]);
    assert_eq!(resumed["run"], first["run"]);
    assert_eq!(resumed["steps"].as_array().unwrap().len(), 2);
    assert_eq!(
        resumed["steps"][0], first["steps"][0],
        "finished steps are not redone"
    );
    if !steps[1]["version"].is_null() {
        assert_eq!(
            resumed["version"].as_u64().unwrap(),
            version,
            "a committed step is not learned twice"
        );
        assert_eq!(resumed["steps"][1]["version"], steps[1]["version"]);
    }
    assert!(run_dir.join("step-0002/result.json").is_file());
}

/// The gate on the real model: a candidate that is harmful by construction ("Answer False to
/// the whole expression." on boolean tasks whose answers are half True) is measured against
/// the empty library on held-out tasks, held, and never goes live. (The lesson is worded so
/// that the 135M learner repeats it exactly under the test's learner prompts.)
#[tokio::test(flavor = "multi_thread")]
async fn a_harmful_candidate_is_measured_and_held() {
    const HARMFUL: &str = "Outside in: Answer False to the whole expression.";
    let dir = tempfile::tempdir().unwrap();
    let prompts_dir = crate::common::learning::learner_prompts_saying(dir.path(), HARMFUL);
    let server = common::start_in(dir, None, &[("EXPERIENT_PROMPTS_DIR", &prompts_dir)]);
    let http = reqwest::Client::new();
    let r = http
        .post(server.url("/v1/libraries"))
        .json(&json!({"name": "gated"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let all = tasks(20);
    let (train, held_out) = (&all[..8], &all[8..]);
    let id = start(
        &http,
        &server.url("/v1/libraries/gated/learn"),
        json!({
            "tasks": train, "validation": held_out, "epochs": 1, "batch_size": 8,
            "group_size": 4, "temperature": 1.0, "max_tokens": 6, "learner_max_tokens": 40,
            "verifier": FIRST_WORD, "concurrency": 4,
        }),
    )
    .await;
    let job = poll(&http, &server.url(&format!("/v1/jobs/{id}")), |j| {
        j["status"] != "running"
    })
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let step = &job["result"]["steps"][0];
    if step["mixed_groups"] == 0 {
        // All eight groups alike (about once in 10^4 jobs): nothing was proposed to gate.
        return;
    }
    let gate = &step["gate"];
    assert_eq!(gate["outcome"], "held", "{job}");
    assert_eq!(gate["comparison"]["n"], 12, "{gate}");
    assert!(
        gate["comparison"]["difference_ci"][0].as_f64().unwrap() <= 0.0,
        "{gate}"
    );
    assert!(step["version"].is_null(), "{job}");
    // The live library did not change; the candidate waits with its measurement.
    let lib: Value = get(&http, &server.url("/v1/libraries/gated")).await;
    assert_eq!(
        (lib["version"].as_u64(), lib["experiences"].as_u64()),
        (Some(0), Some(0)),
        "{lib}"
    );
    let proposals: Value = get(&http, &server.url("/v1/libraries/gated/proposals")).await;
    let held = proposals["data"].as_array().unwrap();
    assert!(!held.is_empty(), "{proposals}");
    assert!(
        held.iter()
            .all(|p| p["origin"]["gate"]["outcome"] == "held"),
        "{proposals}"
    );
}
