//! Code-driven planning through the HTTP API with the real embedded model: the loop runs,
//! records every round and keeps the best program; a kept program is reused without calling
//! the model; progress streams; bad requests get the OpenAI error envelope.
//!
//! The 135M model cannot write a planner, but it repeats a short text under the system prompt
//! "You repeat what the user says, word for word." One server overrides the planning prompts
//! (`EXPERIENT_PROMPTS_DIR`) so that the model writes, in its own reply, first a program that
//! never ends and then, only when the refinement prompt shows it that program's TimeoutError,
//! a program that wins. Another runs the built-in prompts, where the model writes whatever it
//! writes and the loop must still finish and account for every round.

use crate::common;

use async_openai::types::chat::{
    ChatCompletionRequestSystemMessageArgs, ChatCompletionRequestUserMessageArgs,
    CreateChatCompletionRequestArgs,
};
use serde_json::{json, Value};

use crate::common::Server;

const REPEAT: &str = "You repeat what the user says, word for word.";
/// Empty-5x5 from its fixed start: two steps along the top row, turn down, two steps onto the
/// goal. (Written as a comprehension, the one shape of program the model repeats faithfully.)
const WIN: &str =
    "def solve(obs):\n    return [(\"forward\", \"right\")[k] for k in (0, 0, 1, 0, 0)]";
const SPIN: &str = "def solve(obs): return [n for n in range(10 ** 12) if n < 0]";
/// Like SPIN, but keeping every number, so the list outgrows the memory limit.
const HOG: &str = "def solve(obs): return [n for n in range(10 ** 12) if n >= 0]";

fn scripted() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts");
    std::fs::create_dir_all(&prompts).unwrap();
    std::fs::write(
        prompts.join("plan_pseudocode.j2"),
        "Say exactly: Walk to the goal.",
    )
    .unwrap();
    std::fs::write(
        prompts.join("plan_code.j2"),
        format!(
            "{{% if family is startingwith(\"MiniGrid-FourRooms\") %}}Say exactly:\n```python\n{HOG}\n```\
             {{% else %}}Say exactly:\n```python\n{SPIN}\n```{{% endif %}}"
        ),
    )
    .unwrap();
    std::fs::write(
        prompts.join("plan_refine.j2"),
        format!(
            "{{% if \"TimeoutError\" in failures[0].result %}}Say exactly:\n```python\n{WIN}\n```\
             {{% else %}}Say exactly: I give up.{{% endif %}}"
        ),
    )
    .unwrap();
    let p = prompts.display().to_string();
    // A small memory limit and a roomy time limit, so that HOG runs out of memory, not time,
    // even when the model's decoding in the other tests keeps both cores busy.
    let config = "[methods.plan]\nprogram_memory_mib = 32\nprogram_time_secs = 8\n";
    common::start_in(dir, Some(config), &[("EXPERIENT_PROMPTS_DIR", &p)])
}

async fn post(server: &Server, body: &Value) -> (u16, Value) {
    crate::common::call("POST", &server.url("/v1/chat/completions"), Some(body)).await
}

fn plan_request(experient: Value) -> Value {
    json!({
        "model": "plan:smollm2-135m", "temperature": 0, "max_tokens": 64,
        "messages": [
            {"role": "system", "content": REPEAT},
            {"role": "user", "content": "Reach the green square."},
        ],
        "experient": experient,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn refinement_keeps_the_best_program_and_reuses_it() {
    let s = scripted();

    // Through the OpenAI client: the method and the options ride on the request.
    let request = CreateChatCompletionRequestArgs::default()
        .model("plan:smollm2-135m")
        .temperature(0.0)
        .max_tokens(64u32)
        .messages([
            ChatCompletionRequestSystemMessageArgs::default()
                .content(REPEAT)
                .build()
                .unwrap()
                .into(),
            ChatCompletionRequestUserMessageArgs::default()
                .content("Reach the green square.")
                .build()
                .unwrap()
                .into(),
        ])
        .build()
        .unwrap();
    let mut body = serde_json::to_value(&request).unwrap();
    body["experient"] =
        json!({"env": "MiniGrid-Empty-5x5-v0", "train": 2, "instances": [0, 1, 2], "rounds": 2});
    let v: Value = s.client().chat().create_byot(body).await.unwrap();
    let trace = &v["experient"]["trace"];
    assert_eq!(v["experient"]["method"], "plan");
    assert_eq!(trace["reused"], false);
    let rounds = trace["rounds"].as_array().unwrap();
    assert_eq!(
        rounds.len(),
        2,
        "a perfect program ends refinement early: {trace}"
    );
    // Round 0: the program never returns; each training instance is a clean timeout.
    assert!(
        rounds[0]["code"]
            .as_str()
            .unwrap()
            .contains("range(10 ** 12)"),
        "{trace}"
    );
    assert_eq!(rounds[0]["train"]["errors"], 2);
    assert_eq!(rounds[0]["model_calls"], 2, "pseudocode, then code");
    // Round 1 saw that timeout (the override only then says the winning program) and wins.
    assert_eq!(rounds[1]["feedback"], json!(["seed 10000", "seed 10001"]));
    assert_eq!(rounds[1]["train"]["success_rate"], 1.0, "{trace}");
    assert_eq!(trace["best_round"], 1);
    assert_eq!(trace["model_calls"], 3);
    let refined = &trace["refined_program"];
    assert_eq!(refined["summary"]["success_rate"], 1.0);
    assert_eq!(refined["summary"]["instances"], 3);
    let reward = refined["summary"]["mean_reward"].as_f64().unwrap();
    assert!(
        (reward - (1.0 - 0.9 * 5.0 / 100.0)).abs() < 1e-9,
        "5 of 100 steps: {reward}"
    );
    assert_eq!(trace["first_program"]["summary"]["success_rate"], 0.0);
    // 3 calls spread over the 2 training and 3 evaluation instances.
    assert_eq!(refined["model_calls_per_instance"], 0.6);
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("for k in"), "{content}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    // The family's program is kept: new instances are solved without the model.
    let (status, v) = post(
        &s,
        &plan_request(json!({"env": "minigrid-empty-5x5", "instances": [7, 8]})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let trace = &v["experient"]["trace"];
    assert_eq!(trace["reused"], true, "{v}");
    assert_eq!(trace["model_calls"], 0);
    assert_eq!(trace["rounds"], json!([]));
    assert_eq!(v["usage"]["total_tokens"], 0);
    assert_eq!(trace["refined_program"]["summary"]["success_rate"], 1.0);
    let actions = &trace["refined_program"]["runs"][1]["actions"];
    assert_eq!(actions[0], "forward", "{actions}");
    // Amortised: 3 calls over 5 + 2 instances served.
    let per = trace["refined_program"]["model_calls_per_instance"]
        .as_f64()
        .unwrap();
    assert!((per - 3.0 / 7.0).abs() < 1e-9, "{per}");
    let cached = s
        .dir
        .path()
        .join("experience/.programs/MiniGrid-Empty-5x5-v0.json");
    let kept: Value = serde_json::from_str(&std::fs::read_to_string(cached).unwrap()).unwrap();
    assert_eq!(kept["instances_served"], 7);
    assert!(
        kept["program"].as_str().unwrap().contains("for k in"),
        "{kept}"
    );

    // A program that allocates without end fails cleanly, and the server goes on serving.
    // (Imports of os and socket are refused in tests/sandbox.rs; the model will not repeat
    // such a program faithfully enough to test it through the server.)
    let body = plan_request(
        json!({"env": "MiniGrid-FourRooms-v0", "train": 1, "instances": 1, "rounds": 0}),
    );
    let (status, v) = post(&s, &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["experient"]["trace"]["rounds"][0]["train"]["errors"], 1,
        "{v}"
    );
    let error = v["experient"]["trace"]["refined_program"]["runs"][0]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("MemoryError"), "{error}");
    assert_eq!(common::http_status(&s.url("/health")).unwrap(), 200);

    // Streaming: each stage arrives as it happens, then the answer in the chunk protocol.
    let body = plan_request(
        json!({"env": "MiniGrid-Empty-5x5-v0", "train": 1, "instances": 1, "rounds": 1, "refresh": true, "direct": true}),
    );
    let chunks = common::stream_chunks(&s, body).await;
    let stages: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["experient"]["plan"]["stage"].as_str())
        .collect();
    assert_eq!(
        stages,
        ["pseudocode", "program", "refine", "evaluate", "direct"],
        "{chunks:?}"
    );
    let ids: std::collections::HashSet<&str> =
        chunks.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1, "one id for the whole stream");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    let trace = &last["experient"]["trace"];
    assert_eq!(trace["reused"], false);
    assert_eq!(trace["direct"]["summary"]["instances"], 1);
    assert_eq!(trace["direct"]["model_calls_per_instance"], 1.0);
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(streamed.contains("```python"), "{streamed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_loop_with_built_in_prompts_records_every_round() {
    // The model writes what it will; whatever the programs do, each round is accounted for.
    let s = common::shared();
    let mut body = plan_request(json!({
        "env": "MiniGrid-Empty-5x5-v0", "train": 2, "instances": 2, "rounds": 1, "direct": true,
        "refresh": true,
    }));
    body["messages"] = json!([{"role": "user", "content": "Reach the green square."}]);
    body["max_tokens"] = json!(96);
    let (status, v) = post(s, &body).await;
    assert_eq!(status, 200, "{v}");
    let trace = &v["experient"]["trace"];
    let rounds = trace["rounds"].as_array().unwrap();
    let won = rounds[0]["train"]["success_rate"] == 1.0;
    assert_eq!(rounds.len(), if won { 1 } else { 2 }, "{trace}");
    let mut calls = 0;
    for (i, r) in rounds.iter().enumerate() {
        assert_eq!(r["round"], i);
        assert_eq!(r["train"]["instances"], 2);
        assert!(r["usage"]["completion_tokens"].as_u64().unwrap() > 0);
        calls += r["model_calls"].as_u64().unwrap();
    }
    assert_eq!(trace["model_calls"], calls);
    assert!(trace["pseudocode"].as_str().is_some());
    for arm in ["direct", "first_program", "refined_program"] {
        assert_eq!(trace[arm]["summary"]["instances"], 2, "{arm}");
        assert_eq!(trace[arm]["runs"].as_array().unwrap().len(), 2, "{arm}");
    }
    // Direct replies are decoded as lists of the family's own actions: left to itself, the
    // model writes Python here and no action can be read (bench/plan_grammar.py).
    let legal = [
        "left", "right", "forward", "pickup", "drop", "toggle", "done",
    ];
    for run in trace["direct"]["runs"].as_array().unwrap() {
        let actions = run["actions"].as_array().unwrap();
        assert!(!actions.is_empty(), "{run}");
        assert!(
            actions.iter().all(|a| legal.contains(&a.as_str().unwrap())),
            "{run}"
        );
        assert!(run["reply"].as_str().unwrap().starts_with('['), "{run}");
    }
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

/// A correct program does score: the hand-written planners in bench/programs (the ceiling a
/// model-written program can reach) win through the same sandbox and scoring as model
/// programs, in the sandbox's time limit.
#[tokio::test(flavor = "multi_thread")]
async fn a_correct_program_wins_every_level_through_the_sandbox() {
    use experient::planning::{ipp, minigrid::Level, Family};
    std::env::set_var("EXPERIENT_SANDBOX_EXE", env!("CARGO_BIN_EXE_experient"));
    let code = include_str!("../../bench/programs/minigrid_bfs.py");
    let limits = experient::sandbox::Limits::default();
    for id in Level::IDS {
        let family = Family::parse(id).unwrap();
        for seed in [0, 1] {
            let run = ipp::play_one(code, &family.instance(seed), &limits).await;
            assert_eq!(run.error, None, "{id} seed {seed}");
            assert!(run.played.success, "{id} seed {seed}: {run:?}");
        }
    }
    let greedy = include_str!("../../bench/programs/grasp_greedy.py");
    for name in ["grasp", "grasp-diag-carry2-cost0.1"] {
        let family = Family::parse(name).unwrap();
        let mut won = 0;
        for seed in 0..10 {
            let run = ipp::play_one(greedy, &family.instance(seed), &limits).await;
            assert_eq!(run.error, None, "{name} seed {seed}");
            assert!(run.actions.len() <= 20, "{name} seed {seed}: {run:?}");
            won += run.played.success as usize;
        }
        assert!(won >= 8, "{name}: {won} of 10");
    }
}
