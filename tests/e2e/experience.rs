//! The experience store through the HTTP API and the CLI, its durability across restarts and
//! crashes, and libraries applied to chat requests.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{start, start_in, Server, MODEL};
use serde_json::{json, Value};

struct Api<'a> {
    server: &'a Server,
}

impl<'a> Api<'a> {
    fn new(server: &'a Server) -> Self {
        Api { server }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        crate::common::call(method, &self.server.url(path), body.as_ref()).await
    }

    async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.call(method, path, body).await;
        assert!(s == 200 || s == 201, "{method} {path} -> {s} {v}");
        v
    }

    async fn err(&self, method: &str, path: &str, body: Option<Value>, status: u16) -> Value {
        let (s, v) = self.call(method, path, body).await;
        assert_eq!(s, status, "{method} {path} -> {v}");
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e.get("type").is_some() && e.get("param").is_some() && e.get("code").is_some());
        v
    }
}

fn ids(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn curating_a_library_over_http() {
    let server = start(None, &[]);
    let api = Api::new(&server);
    let lib = api
        .ok("POST", "/v1/libraries", Some(json!({"name": "math"})))
        .await;
    assert_eq!(lib["name"], "math");
    assert_eq!(lib["experiences"], 0);
    let (s, _) = api
        .call("POST", "/v1/libraries", Some(json!({"name": "math"})))
        .await;
    assert_eq!(s, 409);
    for bad in ["", "a/b", "..", ".hidden", &"x".repeat(65), "sp ace"] {
        let v = api
            .err("POST", "/v1/libraries", Some(json!({"name": bad})), 400)
            .await;
        assert_eq!(v["error"]["param"], "name");
    }

    let a = api
        .ok("POST", "/v1/libraries/math/experiences",
            Some(json!({"text": "Units check: convert every quantity to one unit before adding.", "tags": ["units"]})))
        .await;
    assert_eq!(a["object"], "experience");
    assert_eq!(a["source"], "manual");
    let a_id = a["id"].as_str().unwrap().to_owned();
    let b = api
        .ok("POST", "/v1/libraries/math/experiences",
            Some(json!({"text": "Percentages: a discount of p percent multiplies the price by (1 - p/100)."})))
        .await;
    let b_id = b["id"].as_str().unwrap().to_owned();
    assert_ne!(a_id, b_id);

    // Ranked search, tag filter, listing.
    let hits = api
        .ok(
            "GET",
            "/v1/libraries/math/experiences?q=discount%20price",
            None,
        )
        .await;
    assert_eq!(hits["object"], "list");
    assert_eq!(ids(&hits)[0], b_id);
    assert!(hits["data"][0]["score"].as_f64().unwrap() > 0.0);
    let tagged = api
        .ok("GET", "/v1/libraries/math/experiences?tag=units", None)
        .await;
    assert_eq!(ids(&tagged), vec![a_id.clone()]);
    let all = api.ok("GET", "/v1/libraries/math/experiences", None).await;
    assert_eq!(ids(&all), vec![a_id.clone(), b_id.clone()]);
    let got = api
        .ok(
            "GET",
            &format!("/v1/libraries/math/experiences/{a_id}"),
            None,
        )
        .await;
    assert_eq!(got["tags"], json!(["units"]));

    // Edit keeps the id; delete removes; ids are never reused.
    let edited = api
        .ok("PATCH", &format!("/v1/libraries/math/experiences/{b_id}"),
            Some(json!({"text": "Percentages: p percent off leaves (100 - p) percent of the price."})))
        .await;
    assert_eq!(edited["id"], b_id.as_str());
    let hits = api
        .ok("GET", "/v1/libraries/math/experiences?q=leaves", None)
        .await;
    assert_eq!(
        ids(&hits),
        vec![b_id.clone()],
        "search sees the edit at once"
    );
    let del = api
        .ok(
            "DELETE",
            &format!("/v1/libraries/math/experiences/{a_id}"),
            None,
        )
        .await;
    assert_eq!(del["deleted"], true);
    let c = api
        .ok(
            "POST",
            "/v1/libraries/math/experiences",
            Some(json!({"text": "Read the question twice."})),
        )
        .await;
    assert_ne!(c["id"], a_id.as_str(), "a deleted id is never reused");
    // The deleted lesson is gone from the words and from the vectors (by meaning, the
    // percentages lesson may still be near "quantity").
    assert!(api
        .ok(
            "GET",
            "/v1/libraries/math/experiences?q=quantity&mode=lexical",
            None
        )
        .await["data"]
        .as_array()
        .unwrap()
        .is_empty());
    let near = api
        .ok(
            "GET",
            "/v1/libraries/math/experiences?q=quantity&mode=semantic",
            None,
        )
        .await;
    assert!(!ids(&near).contains(&a_id), "{near}");

    // Bad input is refused with the envelope and changes nothing.
    let version_before = api.ok("GET", "/v1/libraries/math", None).await["version"].clone();
    api.err(
        "POST",
        "/v1/libraries/math/experiences",
        Some(json!({"text": "   "})),
        400,
    )
    .await;
    api.err(
        "POST",
        "/v1/libraries/math/experiences",
        Some(json!({"text": "x".repeat(2001)})),
        400,
    )
    .await;
    api.err(
        "POST",
        "/v1/libraries/math/experiences",
        Some(json!({"txt": "typo"})),
        400,
    )
    .await;
    api.err(
        "PATCH",
        &format!("/v1/libraries/math/experiences/{a_id}"),
        Some(json!({"text": "gone"})),
        404,
    )
    .await;
    api.err("GET", "/v1/libraries/nope/experiences", None, 404)
        .await;
    api.err("GET", "/v1/libraries/math/experiences/E999", None, 404)
        .await;
    api.err("GET", "/v1/libraries/math/experiences?limit=0", None, 400)
        .await;
    let r = reqwest::Client::new()
        .post(server.url("/v1/libraries/math/experiences"))
        .header("content-type", "application/json")
        .body("{broken")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        api.ok("GET", "/v1/libraries/math", None).await["version"],
        version_before
    );

    // Versions, diff, rollback.
    let versions = api.ok("GET", "/v1/libraries/math/versions", None).await;
    let vs: Vec<u64> = versions["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(vs, vec![0, 1, 2, 3, 4, 5]);
    let v2 = api.ok("GET", "/v1/libraries/math/versions/2", None).await;
    assert_eq!(v2["experiences"].as_array().unwrap().len(), 2);
    let d = api
        .ok("GET", "/v1/libraries/math/diff?from=2&to=5", None)
        .await;
    assert_eq!(d["removed"][0]["id"], a_id.as_str());
    assert_eq!(d["changed"][0]["id"], b_id.as_str());
    assert_eq!(d["added"].as_array().unwrap().len(), 1);
    let rb = api
        .ok(
            "POST",
            "/v1/libraries/math/rollback",
            Some(json!({"version": 2})),
        )
        .await;
    assert_eq!(rb["version"], 6);
    let now = api.ok("GET", "/v1/libraries/math/experiences", None).await;
    assert_eq!(
        ids(&now),
        vec![a_id.clone(), b_id.clone()],
        "rollback restores ids and texts"
    );
    assert_eq!(now["data"][1]["text"], b["text"]);
    api.err(
        "POST",
        "/v1/libraries/math/rollback",
        Some(json!({"version": 99})),
        404,
    )
    .await;

    // Export and import, both formats.
    let ours = api.ok("GET", "/v1/libraries/math/export", None).await;
    assert_eq!(ours["experiences"].as_array().unwrap().len(), 2);
    let flat = api
        .ok("GET", "/v1/libraries/math/export?format=grpo", None)
        .await;
    assert_eq!(flat["G0"], now["data"][0]["text"]);
    api.ok("POST", "/v1/libraries", Some(json!({"name": "copy"})))
        .await;
    let imp = api
        .ok("POST", "/v1/libraries/copy/import", Some(ours))
        .await;
    assert_eq!(imp["imported"].as_array().unwrap().len(), 2);
    let imp = api.ok("POST", "/v1/libraries/copy/import", Some(json!({"G0": "Estimate first: guess the size of the answer.", "G1": "Show the arithmetic."}))).await;
    assert_eq!(imp["library"]["experiences"], 4);
    let copy = api.ok("GET", "/v1/libraries/copy/experiences", None).await;
    assert!(copy["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["source"] == "imported"));
    api.err(
        "POST",
        "/v1/libraries/copy/import",
        Some(json!({"G0": 5})),
        400,
    )
    .await;

    let libs = api.ok("GET", "/v1/libraries", None).await;
    assert_eq!(libs["data"].as_array().unwrap().len(), 2);
    api.ok("DELETE", "/v1/libraries/copy", None).await;
    api.err("GET", "/v1/libraries/copy", None, 404).await;
}

#[tokio::test]
async fn libraries_survive_restarts_and_crashes() {
    let server = start(None, &[]);
    let api = Api::new(&server);
    api.ok("POST", "/v1/libraries", Some(json!({"name": "durable"})))
        .await;
    let first = api
        .ok(
            "POST",
            "/v1/libraries/durable/experiences",
            Some(json!({"text": "Before the restart."})),
        )
        .await;
    let dir = server.kill(libc::SIGTERM);

    let server = start_in(dir, None, &[]);
    let api = Api::new(&server);
    let got = api
        .ok(
            "GET",
            &format!(
                "/v1/libraries/durable/experiences/{}",
                first["id"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert_eq!(got["text"], "Before the restart.");

    // A burst of concurrent writes, then SIGKILL in the middle of it.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for w in 0..4 {
        let url = server.url("/v1/libraries/durable/experiences");
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 0.. {
                let r = http
                    .post(&url)
                    .json(&json!({"text": format!("Writer {w} note {i}: keep going.")}))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 201 => {
                        let v: Value = r.json().await.unwrap();
                        acked
                            .lock()
                            .unwrap()
                            .push(v["id"].as_str().unwrap().to_owned());
                    }
                    _ => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dir = server.kill(libc::SIGKILL);
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 10,
        "the burst wrote something: {}",
        acked.len()
    );

    let server = start_in(dir, None, &[]);
    let api = Api::new(&server);
    let all = api
        .ok("GET", "/v1/libraries/durable/experiences?limit=10000", None)
        .await;
    let present: std::collections::HashSet<String> = ids(&all).into_iter().collect();
    for id in &acked {
        assert!(present.contains(id), "acknowledged {id} lost after SIGKILL");
    }
    // And the library still takes writes.
    api.ok(
        "POST",
        "/v1/libraries/durable/experiences",
        Some(json!({"text": "After the crash."})),
    )
    .await;
}

fn cli(dir: &std::path::Path, args: &[&str]) -> (bool, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_experient"))
        .arg("experience")
        .args(args)
        .arg("--experience-dir")
        .arg(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        out.status.success(),
        serde_json::from_str(&stdout).unwrap_or(Value::Null),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn curating_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert!(cli(dir, &["create", "notes"]).0);
    let (ok, a, _) = cli(
        dir,
        &[
            "add",
            "notes",
            "Check units: convert first.",
            "--tag",
            "units",
        ],
    );
    assert!(ok);
    let id = a["id"].as_str().unwrap().to_owned();
    let (_, b, _) = cli(dir, &["add", "notes", "Work backwards from the question."]);
    let (_, hits, _) = cli(dir, &["search", "notes", "backwards"]);
    assert_eq!(hits[0]["id"], b["id"]);
    let (ok, e, _) = cli(
        dir,
        &[
            "edit",
            "notes",
            &id,
            "--text",
            "Check units: convert everything first.",
        ],
    );
    assert!(ok);
    assert_eq!(e["text"], "Check units: convert everything first.");
    assert!(cli(dir, &["rm", "notes", &id]).0);
    let (_, list, _) = cli(dir, &["list", "notes"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (_, versions, _) = cli(dir, &["versions", "notes"]);
    assert_eq!(versions.as_array().unwrap().len(), 5);
    assert!(cli(dir, &["rollback", "notes", "2"]).0);
    let (_, list, _) = cli(dir, &["list", "notes"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    let (_, flat, _) = cli(dir, &["export", "notes", "--format", "grpo"]);
    let file = dir.join("flat.json");
    std::fs::write(&file, flat.to_string()).unwrap();
    let (ok, imp, _) = cli(
        dir,
        &["import", "other", file.to_str().unwrap(), "--create"],
    );
    assert!(ok);
    assert_eq!(imp["imported"].as_array().unwrap().len(), 2);
    // Errors are clear and leave the library as it was.
    let (ok, _, err) = cli(dir, &["add", "notes", "  "]);
    assert!(!ok && err.contains("text must not be empty"), "{err}");
    let (ok, _, err) = cli(dir, &["rm", "notes", "E42"]);
    assert!(!ok && err.contains("no experience 'E42'"), "{err}");
    let (_, after, _) = cli(dir, &["versions", "notes"]);
    assert_eq!(after.as_array().unwrap().len(), 6);
}

#[tokio::test]
async fn a_second_process_on_the_same_directory_is_refused() {
    let server = start(None, &[]);
    let (ok, _, err) = cli(&server.dir.path().join("experience"), &["libraries"]);
    assert!(!ok);
    assert!(err.contains("in use by another experient process"), "{err}");
}

#[tokio::test]
async fn a_library_is_injected_as_a_prior() {
    let server = start(None, &[]);
    let api = Api::new(&server);
    api.ok("POST", "/v1/libraries", Some(json!({"name": "style"})))
        .await;
    let mut added = vec![];
    for t in [
        "Brevity: answer in one short sentence.",
        "Arithmetic: write each step as an equation.",
        "Geography: name the country as well as the city.",
    ] {
        let e = api
            .ok(
                "POST",
                "/v1/libraries/style/experiences",
                Some(json!({"text": t})),
            )
            .await;
        added.push(e["id"].as_str().unwrap().to_owned());
    }
    let ask = |model: String, extra: Value| {
        let mut body = json!({"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 4});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        body
    };
    let plain = api
        .ok(
            "POST",
            "/v1/chat/completions",
            Some(ask(MODEL.into(), json!({}))),
        )
        .await;
    let with = api
        .ok(
            "POST",
            "/v1/chat/completions",
            Some(ask(format!("{MODEL}@style"), json!({}))),
        )
        .await;
    assert_eq!(with["experient"]["library"], "style");
    assert_eq!(with["experient"]["experiences"], json!(added));
    // The backend saw the prior: the prompt it processed grew by the injected text.
    let grown = with["usage"]["prompt_tokens"].as_u64().unwrap()
        - plain["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(grown > 30, "prompt grew by {grown} tokens");

    // Top-k by relevance through the request object.
    let top = api
        .ok(
            "POST",
            "/v1/chat/completions",
            Some(ask(
                MODEL.into(),
                json!({"experient": {"library": "style", "experiences": 1}}),
            )),
        )
        .await;
    assert_eq!(
        top["experient"]["experiences"],
        json!([added[2]]),
        "the geography lesson is most relevant"
    );

    // Streaming reports the experiences in a header.
    let r = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .json(&ask(format!("{MODEL}@style"), json!({"stream": true})))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-experient-experiences"],
        added.join(",").as_str()
    );
    let _ = r.text().await.unwrap();

    // Uses are counted.
    let e = api
        .ok(
            "GET",
            &format!("/v1/libraries/style/experiences/{}", added[2]),
            None,
        )
        .await;
    assert!(e["uses"].as_u64().unwrap() >= 2, "{e}");

    let v = api
        .err(
            "POST",
            "/v1/chat/completions",
            Some(ask(format!("{MODEL}@missing"), json!({}))),
            404,
        )
        .await;
    assert_eq!(v["error"]["param"], "model");
    let v = api
        .err(
            "POST",
            "/v1/chat/completions",
            Some(ask(format!("{MODEL}@../etc"), json!({}))),
            400,
        )
        .await;
    assert_eq!(v["error"]["param"], "model");
}

#[tokio::test]
async fn reviewing_changes_over_http() {
    let server = start(None, &[]);
    let api = Api::new(&server);
    api.ok("POST", "/v1/libraries", Some(json!({"name": "rev"})))
        .await;
    let e1 = api
        .ok(
            "POST",
            "/v1/libraries/rev/experiences",
            Some(json!({"text": "Units: convert first."})),
        )
        .await;
    let e1 = e1["id"].as_str().unwrap().to_owned();

    // Writes that ask for review are held: 202 with the proposal, the library unchanged.
    let (s, add) = api
        .call(
            "POST",
            "/v1/libraries/rev/experiences?review=true",
            Some(json!({"text": "Reread: read the question twice.", "tags": ["habits"]})),
        )
        .await;
    assert_eq!(s, 202, "{add}");
    assert_eq!(add["object"], "library.proposal");
    assert_eq!(add["status"], "pending");
    assert_eq!(add["change"]["op"], "add");
    assert_eq!(add["origin"]["kind"], "api");
    let (s, edit) = api
        .call(
            "PATCH",
            &format!("/v1/libraries/rev/experiences/{e1}?review=true"),
            Some(json!({"text": "Units: convert everything first."})),
        )
        .await;
    assert_eq!(s, 202, "{edit}");
    let (s, del) = api
        .call(
            "DELETE",
            &format!("/v1/libraries/rev/experiences/{e1}?review=true"),
            None,
        )
        .await;
    assert_eq!(s, 202, "{del}");
    let lib = api.ok("GET", "/v1/libraries/rev", None).await;
    assert_eq!(
        (lib["version"].as_u64(), lib["pending_proposals"].as_u64()),
        (Some(1), Some(3))
    );
    api.err(
        "POST",
        "/v1/libraries/rev/experiences?review=maybe",
        Some(json!({"text": "A: b."})),
        400,
    )
    .await;
    api.err(
        "POST",
        "/v1/libraries/rev/experiences?review=true",
        Some(json!({"text": " "})),
        400,
    )
    .await;
    api.err(
        "DELETE",
        "/v1/libraries/rev/experiences/E99?review=true",
        None,
        404,
    )
    .await;

    // The list shows what each would change; one proposal in full.
    let list = api.ok("GET", "/v1/libraries/rev/proposals", None).await;
    assert_eq!(ids(&list).len(), 3);
    assert_eq!(list["data"][1]["current"]["text"], "Units: convert first.");
    let one = api
        .ok(
            "GET",
            &format!(
                "/v1/libraries/rev/proposals/{}",
                add["id"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert_eq!(one["change"]["text"], "Reread: read the question twice.");
    api.err("GET", "/v1/libraries/rev/proposals/P99", None, 404)
        .await;
    api.err("GET", "/v1/libraries/rev/proposals?status=odd", None, 400)
        .await;

    // Approve two together, one with an edit: one version, naming them and the reviewer.
    let (a, e) = (add["id"].as_str().unwrap(), edit["id"].as_str().unwrap());
    let v = api
        .ok(
            "POST",
            "/v1/libraries/rev/proposals/approve",
            Some(json!({"ids": [a, e], "reviewer": "ada", "edits": {a: {"text": "Reread: read it twice."}}})),
        )
        .await;
    assert_eq!(v["version"], 2, "{v}");
    assert_eq!(v["review"]["proposals"], json!([a, e]));
    assert_eq!(v["review"]["reviewer"], "ada");
    assert_eq!(v["review"]["edited"], json!([a]));
    let exps = api.ok("GET", "/v1/libraries/rev/experiences", None).await;
    let texts: Vec<&str> = exps["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["Units: convert everything first.", "Reread: read it twice."]
    );
    let err = api
        .err(
            "POST",
            &format!("/v1/libraries/rev/proposals/{a}/approve"),
            None,
            409,
        )
        .await;
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already approved"),
        "{err}"
    );

    // Reject the delete: nothing changes, and the decision is kept.
    let d = del["id"].as_str().unwrap();
    let r = api
        .ok(
            "POST",
            &format!("/v1/libraries/rev/proposals/{d}/reject"),
            Some(json!({"reason": "still useful"})),
        )
        .await;
    assert_eq!(r["data"][0]["status"], "rejected");
    api.err(
        "POST",
        &format!("/v1/libraries/rev/proposals/{d}/approve"),
        Some(json!({"text": 3})),
        400,
    )
    .await;
    let lib = api.ok("GET", "/v1/libraries/rev", None).await;
    assert_eq!(
        (
            lib["experiences"].as_u64(),
            lib["pending_proposals"].as_u64()
        ),
        (Some(2), Some(0))
    );
    let all = api
        .ok("GET", "/v1/libraries/rev/proposals?status=all", None)
        .await;
    assert_eq!(ids(&all).len(), 3);

    // Provenance: how each entered and every version that touched it.
    let p = api
        .ok(
            "GET",
            &format!("/v1/libraries/rev/experiences/{e1}/provenance"),
            None,
        )
        .await;
    assert_eq!(p["object"], "experience.provenance");
    assert_eq!(p["source"], "manual");
    let vs = p["versions"].as_array().unwrap();
    assert_eq!(vs.len(), 2, "{p}");
    assert_eq!(vs[1]["op"]["op"], "update");
    assert_eq!(vs[1]["review"]["reviewer"], "ada");
    assert_eq!(vs[1]["proposal"]["id"], e);
    assert!(p["learned"].is_null());
    let reread = exps["data"][1]["id"].as_str().unwrap().to_owned();
    api.ok(
        "DELETE",
        &format!("/v1/libraries/rev/experiences/{reread}"),
        None,
    )
    .await;
    let gone = api
        .ok(
            "GET",
            &format!("/v1/libraries/rev/experiences/{reread}/provenance"),
            None,
        )
        .await;
    assert_eq!(
        gone["deleted"], true,
        "a deleted experience keeps its history: {gone}"
    );
    assert_eq!(gone["versions"].as_array().unwrap().len(), 2);
    api.err(
        "GET",
        "/v1/libraries/rev/experiences/E77/provenance",
        None,
        404,
    )
    .await;
    api.err("GET", "/v1/jobs/job_nope/chart.svg", None, 404)
        .await;

    // The UI is served by the binary itself, locked down.
    let r = reqwest::get(server.url("/ui")).await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    let html = r.text().await.unwrap();
    assert!(html.contains("/ui/app.js"));
    let js = reqwest::get(server.url("/ui/app.js")).await.unwrap();
    assert!(js.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
}

#[test]
fn reviewing_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert!(cli(dir, &["create", "notes"]).0);
    let (ok, p1, err) = cli(dir, &["add", "notes", "Units: convert first.", "--review"]);
    assert!(ok, "{err}");
    assert_eq!(
        (p1["id"].as_str(), p1["status"].as_str()),
        (Some("P1"), Some("pending"))
    );
    assert!(cli(dir, &["add", "notes", "Guess: say True.", "--review"]).0);
    let (_, list, _) = cli(dir, &["list", "notes"]);
    assert_eq!(list, json!([]), "nothing is live before review");
    let (ok, pending, err) = cli(dir, &["proposals", "notes"]);
    assert!(ok, "{err}");
    assert_eq!(pending.as_array().unwrap().len(), 2);
    let (ok, v, err) = cli(
        dir,
        &[
            "approve",
            "notes",
            "P1",
            "--reviewer",
            "ada",
            "--text",
            "Units: convert everything first.",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(v["review"]["proposals"], json!(["P1"]));
    assert_eq!(v["review"]["edited"], json!(["P1"]));
    let (ok, _, err) = cli(dir, &["reject", "notes", "P2", "--reason", "a guess"]);
    assert!(ok, "{err}");
    let (_, list, _) = cli(dir, &["list", "notes"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["text"], "Units: convert everything first.");
    let (ok, _, err) = cli(dir, &["approve", "notes", "P2"]);
    assert!(!ok && err.contains("already rejected"), "{err}");
    let (_, pending, _) = cli(dir, &["proposals", "notes"]);
    assert_eq!(pending, json!([]));
    let (_, decided, _) = cli(dir, &["proposals", "notes", "--status", "all"]);
    assert_eq!(decided.as_array().unwrap().len(), 2);
}
