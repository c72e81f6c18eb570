//! Replicas sharing one real PostgreSQL (`--database-url`): three `experient` processes, each
//! with its own experience directory, behave as one server to curators and clients.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::postgres::cluster;
use crate::common::{call, start, Server, MODEL};

/// `n` replicas on one fresh database.
fn replicas(db: &str, n: usize) -> Vec<Server> {
    let url = cluster().database(db);
    // Started one after another: each migrates (the first) or finds the schema migrated.
    (0..n)
        .map(|_| start(None, &[("EXPERIENT_DATABASE_URL", url.as_str())]))
        .collect()
}

async fn ok(s: &Server, method: &str, path: &str, body: Option<Value>) -> Value {
    let (st, v) = call(method, &s.url(path), body.as_ref()).await;
    assert!((200..300).contains(&st), "{method} {path}: {st} {v}");
    v
}

fn texts(list: &Value) -> Vec<String> {
    let mut t: Vec<String> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["text"].as_str().unwrap().to_owned())
        .collect();
    t.sort();
    t
}

/// Polls `f` until it holds, for at most `limit`; returns how long it took.
async fn within<F, Fut>(limit: Duration, what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    loop {
        if f().await {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_on_one_replica_is_found_on_the_others_within_a_second() {
    let r = replicas("follow", 3);
    let (a, b, c) = (&r[0], &r[1], &r[2]);
    ok(a, "POST", "/v1/libraries", Some(json!({"name": "ops"}))).await;
    // Created on A, it is there on B at once (a miss asks the database).
    ok(b, "GET", "/v1/libraries/ops", None).await;
    let (st, _) = call(
        "POST",
        &c.url("/v1/libraries"),
        Some(&json!({"name": "ops"})),
    )
    .await;
    assert_eq!(st, 409, "the name is taken on every replica");

    let text = "Rotate the signing keys before the certificate expires.";
    ok(
        a,
        "POST",
        "/v1/libraries/ops/experiences",
        Some(json!({"text": text})),
    )
    .await;
    let q = "/v1/libraries/ops/experiences?q=signing%20keys&mode=lexical";
    for other in [b, c] {
        let lag = within(
            Duration::from_secs(1),
            "search on another replica",
            || async {
                let (_, v) = call("GET", &other.url(q), None).await;
                v["data"][0]["text"] == text
            },
        )
        .await;
        eprintln!("found on {} after {lag:?}", other.base);
    }

    // Settings written on B are served by A and C.
    let mut settings = ok(b, "GET", "/v1/libraries/ops", None).await["settings"].clone();
    settings["top_k"] = json!(2);
    ok(b, "PATCH", "/v1/libraries/ops", Some(settings)).await;
    for other in [a, c] {
        within(
            Duration::from_secs(1),
            "settings on another replica",
            || async {
                let (_, v) = call("GET", &other.url("/v1/libraries/ops"), None).await;
                v["settings"]["top_k"] == 2
            },
        )
        .await;
    }

    // Deleted on C, gone everywhere; created again, the new one is empty everywhere.
    ok(c, "DELETE", "/v1/libraries/ops", None).await;
    for other in [a, b] {
        within(
            Duration::from_secs(1),
            "deletion on another replica",
            || async { call("GET", &other.url("/v1/libraries/ops"), None).await.0 == 404 },
        )
        .await;
    }
    ok(c, "POST", "/v1/libraries", Some(json!({"name": "ops"}))).await;
    let v = ok(a, "GET", "/v1/libraries/ops/experiences", None).await;
    assert_eq!(texts(&v), Vec::<String>::new(), "{v}");

    // A prior served on B comes from the library written on A.
    ok(
        a,
        "POST",
        "/v1/libraries/ops/experiences",
        Some(json!({"text": text})),
    )
    .await;
    within(Duration::from_secs(1), "the new library on B", || async {
        let (_, v) = call("GET", &b.url("/v1/libraries/ops/experiences"), None).await;
        texts(&v) == [text]
    })
    .await;
    let answer = ok(
        b,
        "POST",
        "/v1/chat/completions",
        Some(json!({
            "model": format!("{MODEL}@ops"),
            "messages": [{"role": "user", "content": "When do keys rotate?"}],
            "max_tokens": 4,
        })),
    )
    .await;
    assert_eq!(answer["experient"]["library"], "ops", "{answer}");
    assert_eq!(
        answer["experient"]["experiences"],
        json!(["E1"]),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_commits_from_three_replicas_are_sequential_and_complete() {
    let r = replicas("race", 3);
    ok(
        &r[0],
        "POST",
        "/v1/libraries",
        Some(json!({"name": "race"})),
    )
    .await;
    let per = 15;
    let mut writes = Vec::new();
    for (i, s) in r.iter().enumerate() {
        for j in 0..per {
            let url = s.url("/v1/libraries/race/experiences");
            writes.push(tokio::spawn(async move {
                let body = json!({"text": format!("Lesson {i}-{j}: written on replica {i}.")});
                call("POST", &url, Some(&body)).await
            }));
        }
    }
    let mut ids = Vec::new();
    for w in writes {
        let (st, v) = w.await.unwrap();
        assert_eq!(st, 201, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3 * per, "every write has its own id");
    let want: Vec<String> = (0..3)
        .flat_map(|i| (0..per).map(move |j| format!("Lesson {i}-{j}: written on replica {i}.")))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    for s in &r {
        within(
            Duration::from_secs(2),
            "every write on every replica",
            || async {
                let (_, v) = call(
                    "GET",
                    &s.url("/v1/libraries/race/experiences?limit=1000"),
                    None,
                )
                .await;
                texts(&v) == want
            },
        )
        .await;
        let versions = ok(s, "GET", "/v1/libraries/race/versions", None).await;
        let mut numbers: Vec<u64> = versions["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["version"].as_u64().unwrap())
            .collect();
        numbers.sort();
        assert_eq!(
            numbers,
            (0..=(3 * per) as u64).collect::<Vec<_>>(),
            "one version per write, numbered without gaps, on {}",
            s.base
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_a_replica_in_a_write_burst_loses_no_acknowledged_write() {
    let r = replicas("crash", 2);
    let (a, b) = (&r[0], &r[1]);
    ok(a, "POST", "/v1/libraries", Some(json!({"name": "burst"}))).await;
    let url = a.url("/v1/libraries/burst/experiences");
    let acked = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    // Eight writers, each writing until the replica stops answering.
    let mut writers = Vec::new();
    for w in 0..8 {
        let (url, acked) = (url.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            let client = ::reqwest::Client::new();
            for j in 0.. {
                let text = format!("Burst lesson {w}-{j}.");
                match client
                    .post(&url)
                    .json(&json!({ "text": text }))
                    .send()
                    .await
                {
                    Ok(r) if r.status().as_u16() == 201 => acked.lock().push(text),
                    _ => return,
                }
            }
        }));
    }
    within(Duration::from_secs(60), "writes acknowledged", || async {
        acked.lock().len() >= 40
    })
    .await;
    a.signal(libc::SIGKILL);
    for w in writers {
        w.await.unwrap();
    }
    let acknowledged = acked.lock().clone();
    assert!(!acknowledged.is_empty(), "some writes were acknowledged");
    within(
        Duration::from_secs(2),
        "B holds every acknowledged write",
        || async {
            let (_, v) = call(
                "GET",
                &b.url("/v1/libraries/burst/experiences?limit=1000"),
                None,
            )
            .await;
            let held = texts(&v);
            acknowledged.iter().all(|t| held.contains(t))
        },
    )
    .await;
    eprintln!("{} writes acknowledged before the kill", acknowledged.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_responses_conversation_continues_on_another_replica() {
    let r = replicas("responses", 3);
    let first = ok(
        &r[0],
        "POST",
        "/v1/responses",
        Some(json!({"model": MODEL, "input": "Say hello.", "max_output_tokens": 4})),
    )
    .await;
    let id = first["id"].as_str().unwrap();
    let next = ok(
        &r[1],
        "POST",
        "/v1/responses",
        Some(json!({
            "model": MODEL,
            "input": "Again.",
            "previous_response_id": id,
            "max_output_tokens": 4,
        })),
    )
    .await;
    assert_eq!(next["previous_response_id"], id, "{next}");
    // B found A's record (an unknown id is 404); C serves both turns.
    for (id, said) in [(id, "Say hello."), (next["id"].as_str().unwrap(), "Again.")] {
        let got = ok(&r[2], "GET", &format!("/v1/responses/{id}"), None).await;
        assert_eq!(got["id"], id);
        let items = ok(
            &r[2],
            "GET",
            &format!("/v1/responses/{id}/input_items"),
            None,
        )
        .await;
        assert_eq!(items["data"][0]["content"], said, "{items}");
    }
    ok(&r[2], "DELETE", &format!("/v1/responses/{id}"), None).await;
    let (st, _) = call("GET", &r[0].url(&format!("/v1/responses/{id}")), None).await;
    assert_eq!(st, 404, "deleted on one replica, gone on all");
}

#[tokio::test(flavor = "multi_thread")]
async fn feedback_on_an_answer_one_replica_served_is_taken_by_another() {
    let r = replicas("feedback", 3);
    ok(
        &r[0],
        "POST",
        "/v1/libraries",
        Some(json!({"name": "rec", "settings": {"record": true}})),
    )
    .await;
    let answer = ok(
        &r[0],
        "POST",
        "/v1/chat/completions",
        Some(json!({
            "model": format!("{MODEL}@rec"),
            "messages": [{"role": "user", "content": "Is 2 even?"}],
            "max_tokens": 2,
        })),
    )
    .await;
    let id = answer["id"].as_str().unwrap();
    let fb = ok(
        &r[1],
        "POST",
        "/v1/feedback",
        Some(json!({"id": id, "label": "good"})),
    )
    .await;
    assert_eq!(fb["response_id"], id, "{fb}");
    assert_eq!(fb["library"], "rec", "{fb}");
    let list = ok(&r[2], "GET", "/v1/feedback?library=rec", None).await;
    assert_eq!(list["data"][0]["id"], fb["id"], "{list}");
    // Feedback on an answer nobody recorded is refused on every replica alike.
    let (st, e) = call(
        "POST",
        &r[2].url("/v1/feedback"),
        Some(&json!({"id": "chatcmpl-unknown", "label": "good"})),
    )
    .await;
    assert_eq!((st, e["error"]["param"].as_str()), (404, Some("id")), "{e}");
    // Purged on one replica, gone on all.
    ok(&r[2], "DELETE", "/v1/libraries/rec/traffic", None).await;
    let list = ok(&r[0], "GET", "/v1/feedback?library=rec", None).await;
    assert_eq!(list["data"], json!([]), "{list}");
}

/// What a store shows a curator and a client: the library's versions and experiences, a stored
/// response, the feedback.
async fn snapshot(s: &Server, response: &str) -> Value {
    json!({
        "versions": ok(s, "GET", "/v1/libraries/kept/versions", None).await["data"],
        "experiences": ok(s, "GET", "/v1/libraries/kept/experiences", None).await["data"],
        "settings": ok(s, "GET", "/v1/libraries/kept", None).await["settings"],
        "response": ok(s, "GET", &format!("/v1/responses/{response}"), None).await["output"],
        "feedback": ok(s, "GET", "/v1/feedback?library=kept", None).await["data"],
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_store_moves_to_postgres_and_back_whole() {
    let url = cluster().database("migrate");
    let files = start(None, &[]);
    ok(
        &files,
        "POST",
        "/v1/libraries",
        Some(json!({"name": "kept", "settings": {"record": true}})),
    )
    .await;
    for text in ["Check units first.", "Estimate before computing."] {
        let body = json!({ "text": text });
        ok(&files, "POST", "/v1/libraries/kept/experiences", Some(body)).await;
    }
    let patch = json!({"text": "Check the units of every quantity first."});
    ok(
        &files,
        "PATCH",
        "/v1/libraries/kept/experiences/E1",
        Some(patch),
    )
    .await;
    let chat = json!({"model": format!("{MODEL}@kept"), "max_tokens": 2,
        "messages": [{"role": "user", "content": "2 m + 30 cm?"}]});
    let answer = ok(&files, "POST", "/v1/chat/completions", Some(chat)).await;
    let fb = json!({"id": answer["id"], "label": "bad", "expected": "2.3 m"});
    ok(&files, "POST", "/v1/feedback", Some(fb)).await;
    let resp = json!({"model": MODEL, "input": "Hi.", "max_output_tokens": 2});
    let response = ok(&files, "POST", "/v1/responses", Some(resp)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = snapshot(&files, &response).await;
    let home = files.kill(libc::SIGTERM);

    let exp = home.path().join("experience");
    let env = [("EXPERIENT_DATABASE_URL", url.as_str())];
    let moved = crate::common::cli_json(&["store", "migrate", "--to", "postgres"], &exp, &env);
    assert_eq!(
        (
            &moved["libraries"],
            &moved["versions"],
            &moved["responses"],
            &moved["traffic_records"],
            &moved["feedback"],
            &moved["verified"]
        ),
        (
            &json!(1),
            &json!(4),
            &json!(1),
            &json!(1),
            &json!(1),
            &json!(true)
        ),
        "{moved}"
    );
    // A new replica serves the same, use counts included, but for the credit, which is still
    // each replica's own (docs/deployment.md).
    let replica = start(None, &env);
    assert_eq!(
        without_credit(snapshot(&replica, &response).await),
        without_credit(before.clone())
    );
    // The old directory, now a replica's own, serves all of it, counts included.
    let old = crate::common::start_in(home, None, &env);
    assert_eq!(snapshot(&old, &response).await, before);
    drop(old.kill(libc::SIGTERM));
    drop(replica.kill(libc::SIGTERM));

    let back = tempfile::tempdir().unwrap();
    let exp = back.path().join("experience");
    let moved = crate::common::cli_json(&["store", "migrate", "--to", "files"], &exp, &env);
    assert_eq!(moved["versions"], 4, "{moved}");
    let files = crate::common::start_in(back, None, &[]);
    assert_eq!(
        without_credit(snapshot(&files, &response).await),
        without_credit(before)
    );
}

fn without_credit(mut v: Value) -> Value {
    for e in v["experiences"].as_array_mut().unwrap() {
        for k in ["helpful", "harmful", "credit"] {
            e.as_object_mut().unwrap().remove(k);
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn proposals_made_on_two_replicas_are_reviewed_on_a_third() {
    let r = replicas("review", 3);
    ok(&r[0], "POST", "/v1/libraries", Some(json!({"name": "rev"}))).await;
    // Proposals made at once on two replicas: none is lost, ids do not collide.
    let mut made = Vec::new();
    for (i, s) in r[..2].iter().enumerate() {
        for j in 0..5 {
            let url = s.url("/v1/libraries/rev/experiences?review=true");
            made.push(tokio::spawn(async move {
                let body = json!({"text": format!("Proposed {i}-{j}: check the sign.")});
                call("POST", &url, Some(&body)).await
            }));
        }
    }
    let mut ids = Vec::new();
    for m in made {
        let (st, v) = m.await.unwrap();
        assert_eq!(st, 202, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 10, "{ids:?}");
    let list = ok(&r[2], "GET", "/v1/libraries/rev/proposals", None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 10, "{list}");
    // Approved on the third, the version and the decision are seen everywhere.
    let v = ok(
        &r[2],
        "POST",
        "/v1/libraries/rev/proposals/approve",
        Some(json!({"ids": [ids[0], ids[7]], "reviewer": "ana"})),
    )
    .await;
    assert_eq!(v["version"], 1, "{v}");
    for s in &r[..2] {
        let pending = ok(s, "GET", "/v1/libraries/rev/proposals", None).await;
        assert_eq!(pending["data"].as_array().unwrap().len(), 8, "{pending}");
        within(Duration::from_secs(1), "the approved version", || async {
            let (_, v) = call("GET", &s.url("/v1/libraries/rev/experiences"), None).await;
            v["data"].as_array().is_some_and(|d| d.len() == 2)
        })
        .await;
    }
    // Deciding it again on another replica is refused: it is decided.
    let (st, e) = call(
        "POST",
        &r[1].url(&format!("/v1/libraries/rev/proposals/{}/approve", ids[0])),
        Some(&json!({})),
    )
    .await;
    assert_eq!(st, 409, "{e}");
}
