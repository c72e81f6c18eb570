//! The curation UI in a real browser: Debian's headless Chromium, driven over WebDriver
//! (chromedriver) by fantoccini, against the real server on the embedded model, with admin
//! keys configured so the UI has to ask for one.
//!
//! One session walks what a curator does: give the key, create a library, add, search, edit
//! and delete experiences, roll back, turn review on, learn from tasks in the browser (the
//! learning run's operations land as proposals), read a proposal's evidence, approve one,
//! reject one, read the approved experience's provenance, start and cancel a job, and try the
//! library beside the bare model. API errors must show as what they say.
//!
//! Screenshots go to target/ui-screenshots/; with EXPERIENT_UPDATE_DOCS=1 they are also
//! copied to docs/ui/ for docs/libraries.md. Chromium and chromedriver are required: without them the
//! test fails, it does not skip (`.ci/run` installs them).

use crate::common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const ADMIN_KEY: &str = "ui-test-admin-key";

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// chromedriver on a free port, once it answers.
fn chromedriver() -> (Driver, String) {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "chromedriver is needed for the UI tests: apt-get install chromium chromium-driver",
        );
    let deadline = Instant::now() + Duration::from_secs(30);
    // It keeps connections open whatever the request asks, so readiness is a listening port.
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    (Driver(child), format!("http://127.0.0.1:{port}"))
}

async fn browser(driver: &str) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--no-first-run", "--disable-dev-shm-usage", "--window-size=1440,1000"],
        }),
    );
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(driver)
        .await
        .expect("start a chromium session");
    c.set_window_size(1440, 1000).await.unwrap();
    c
}

fn shots_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a screenshot is a PNG");
    std::fs::write(shots_dir().join(format!("{name}.png")), &png).unwrap();
    if std::env::var("EXPERIENT_UPDATE_DOCS").as_deref() == Ok("1") {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/ui");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::write(docs.join(format!("{name}.png")), &png).unwrap();
    }
}

/// Waits until the element `css` exists and its text satisfies `ok`; returns the text.
async fn wait_text(c: &Client, css: &str, secs: u64, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = String::new();
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                if ok(&t) {
                    return t;
                }
                last = t;
            }
        }
        if Instant::now() > deadline {
            let errors = errors_shown(c).await;
            panic!("'{css}' never showed what was expected; last text: {last:?}; errors shown: {errors:?}");
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

async fn wait_for(c: &Client, css: &str) -> fantoccini::elements::Element {
    wait_text(c, css, 30, |_| true).await;
    c.find(Locator::Css(css)).await.unwrap()
}

async fn wait_gone(c: &Client, css: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.find(Locator::Css(css)).await.is_ok() {
        assert!(Instant::now() < deadline, "'{css}' never went away");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

async fn click(c: &Client, css: &str) {
    wait_for(c, css).await.click().await.unwrap();
}

async fn type_into(c: &Client, css: &str, text: &str) {
    let e = wait_for(c, css).await;
    e.clear().await.unwrap();
    e.send_keys(text).await.unwrap();
}

/// Sets a form field's value directly: send_keys types a character at a time, which is slow
/// for a task list and turns newlines into Enter presses.
async fn set_value(c: &Client, css: &str, text: &str) {
    wait_for(c, css).await;
    c.execute(
        "const e = document.querySelector(arguments[0]); e.value = arguments[1]; \
         e.dispatchEvent(new Event('input', {bubbles: true}));",
        vec![json!(css), json!(text)],
    )
    .await
    .unwrap();
}

async fn errors_shown(c: &Client) -> Vec<String> {
    let mut out = Vec::new();
    for e in c
        .find_all(Locator::Css("#errors .error .msg"))
        .await
        .unwrap_or_default()
    {
        out.push(e.text().await.unwrap_or_default());
    }
    out
}

async fn dismiss_errors(c: &Client) {
    c.execute(
        "document.querySelector('#errors').replaceChildren()",
        vec![],
    )
    .await
    .unwrap();
}

async fn goto(c: &Client, base: &str, hash: &str) {
    c.goto(&format!("{base}/ui{hash}")).await.unwrap();
}

/// An admin API call from the test itself, to check what the UI did.
async fn admin(http: &reqwest::Client, url: String) -> Value {
    http.get(url)
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Tasks as the learn form takes them: one JSON object a line.
fn tasks(n: usize) -> String {
    common::learning::bool_tasks(n)
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_curator_works_a_library_end_to_end_in_the_browser() {
    let (_driver, driver_url) = chromedriver();
    let dir = tempfile::tempdir().unwrap();
    let prompts = common::learning::learner_prompts(dir.path());
    let server = common::start_in(
        dir,
        None,
        &[
            ("EXPERIENT_ADMIN_KEYS", ADMIN_KEY),
            ("EXPERIENT_PROMPTS_DIR", &prompts),
        ],
    );
    let http = reqwest::Client::new();
    let c = browser(&driver_url).await;
    let base = server.base.clone();
    let api = |p: &str| format!("{base}{p}");

    // The UI's files need no key; the first API call does, so the UI asks for it once.
    goto(&c, &base, "#/").await;
    wait_for(&c, "#key-dialog[open]").await;
    type_into(&c, "#key-input", ADMIN_KEY).await;
    click(&c, "#key-save").await;
    wait_for(&c, "#new-lib-name").await;

    // An API error is shown as what the server said.
    type_into(&c, "#new-lib-name", "bad name").await;
    c.execute(
        "document.querySelector('#new-lib-name').removeAttribute('pattern')",
        vec![],
    )
    .await
    .unwrap();
    click(&c, "#create-lib").await;
    let err = wait_text(&c, "#errors .error .msg", 30, |t| !t.is_empty()).await;
    assert!(
        err.contains("400") && err.contains("invalid library name 'bad name'"),
        "{err}"
    );
    dismiss_errors(&c).await;

    // Create a library; the UI goes to it.
    type_into(&c, "#new-lib-name", "tips").await;
    click(&c, "#create-lib").await;
    wait_text(&c, "h1", 30, |t| t.starts_with("tips")).await;

    // Add two experiences.
    for (text, tags) in [
        (
            "Units: convert every quantity to the same unit before adding.",
            "math, units",
        ),
        (
            "Reread: read the question again before answering.",
            "habits",
        ),
    ] {
        type_into(&c, "#new-text", text).await;
        type_into(&c, "#new-tags", tags).await;
        click(&c, "#add-exp").await;
        wait_text(&c, "#experiences", 30, |t| t.contains(text)).await;
    }
    wait_for(&c, "tr[data-id='E1']").await;
    wait_for(&c, "tr[data-id='E2']").await;
    let lib = admin(&http, api("/v1/libraries/tips/experiences")).await;
    assert_eq!(lib["data"].as_array().unwrap().len(), 2, "{lib}");
    assert_eq!(lib["data"][0]["tags"], json!(["math", "units"]));

    // Search ranks by BM25: only the matching experience is left.
    type_into(&c, "#search", "unit").await;
    wait_gone(&c, "tr[data-id='E2']").await;
    wait_for(&c, "tr[data-id='E1']").await;
    screenshot(&c, "experiences-search").await;
    set_value(&c, "#search", "").await;
    wait_for(&c, "tr[data-id='E2']").await;

    // Edit E2 inline.
    click(&c, "tr[data-id='E2'] button.edit").await;
    type_into(
        &c,
        "tr[data-id='E2'] textarea.edit-text",
        "Reread: read the question twice, then answer.",
    )
    .await;
    click(&c, "tr[data-id='E2'] button.save").await;
    wait_text(&c, "tr[data-id='E2']", 30, |t| t.contains("twice")).await;
    let e2 = admin(&http, api("/v1/libraries/tips/experiences/E2")).await;
    assert_eq!(e2["text"], "Reread: read the question twice, then answer.");

    // Delete E1, confirmed in the dialog.
    click(&c, "tr[data-id='E1'] button.delete").await;
    wait_for(&c, "#confirm-dialog[open]").await;
    click(&c, "#confirm-yes").await;
    wait_gone(&c, "tr[data-id='E1']").await;
    let gone = http
        .get(api("/v1/libraries/tips/experiences/E1"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);

    // Versions: the timeline, the diff of the last change, and a rollback to before it.
    click(&c, "a[data-tab='versions']").await;
    wait_for(&c, "#versions li[data-version='4']").await;
    wait_text(&c, "#diff", 30, |t| t.contains("1 removed")).await;
    screenshot(&c, "versions").await;
    click(&c, "#versions li[data-version='3'] button.rollback").await;
    wait_for(&c, "#confirm-dialog[open]").await;
    click(&c, "#confirm-yes").await;
    wait_for(&c, "#versions li[data-version='5']").await;
    let e1 = admin(&http, api("/v1/libraries/tips/experiences/E1")).await;
    assert_eq!(
        e1["text"], "Units: convert every quantity to the same unit before adding.",
        "the rollback brought E1 back: {e1}"
    );

    // Turn review on in the settings.
    click(&c, "a[data-tab='settings']").await;
    click(&c, "#review").await;
    click(&c, "#save-settings").await;
    wait_for(&c, "#settings-saved .notice").await;
    let lib = admin(&http, api("/v1/libraries/tips")).await;
    assert_eq!(lib["settings"]["review"], true, "{lib}");

    // Learn from tasks in the browser; with review on, what it learns waits as proposals.
    click(&c, "a[data-tab='learn']").await;
    set_value(&c, "#tasks", &tasks(8)).await;
    set_value(
        &c,
        "#learn-options",
        &json!({"temperature": 1.0, "max_tokens": 6, "learner_max_tokens": 40,
                "verifier": common::learning::FIRST_WORD, "concurrency": 4, "tags": ["bbh"]})
        .to_string(),
    )
    .await;
    click(&c, "#start-job").await;
    wait_text(&c, "#jobs .status", 30, |t| t == "running").await;
    screenshot(&c, "learn-running").await;
    wait_text(&c, "#jobs .status", 900, |t| t != "running").await;
    let status = wait_text(&c, "#jobs .status", 5, |_| true).await;
    assert_eq!(status, "succeeded", "errors: {:?}", errors_shown(&c).await);
    wait_for(&c, "#jobs img.chart").await;
    let cost = wait_text(&c, "#jobs .job-cost", 5, |_| true).await;
    assert!(
        cost.starts_with("cost: ") && cost.contains("model calls"),
        "{cost}"
    );
    screenshot(&c, "learn-done").await;
    let lib = admin(&http, api("/v1/libraries/tips")).await;
    assert_eq!(
        lib["experiences"], 2,
        "nothing learned is live before review: {lib}"
    );
    let pending = admin(&http, api("/v1/libraries/tips/proposals")).await;
    let pending = pending["data"].as_array().unwrap().clone();
    assert!(!pending.is_empty(), "learning proposed nothing");
    let first = pending[0]["id"].as_str().unwrap().to_owned();

    // A proposal made by hand too (an API write that asks for review), to reject.
    click(&c, "a[data-tab='experiences']").await;
    type_into(&c, "#new-text", "Guess: when unsure, answer True.").await;
    click(&c, "#new-propose").await;
    click(&c, "#add-exp").await;
    wait_for(&c, "#proposals").await;

    // The proposals, with the learned one's evidence: the task, rewards, the comparison.
    let card = format!("[data-proposal='{first}']");
    wait_for(&c, &card).await;
    click(&c, &format!("{card} details.evidence-box summary")).await;
    let evidence = wait_text(&c, &format!("{card} .evidence"), 30, |t| {
        t.contains("Question")
    })
    .await;
    assert!(evidence.contains("Rewards"), "{evidence}");
    type_into(&c, "#reviewer", "ada").await;
    screenshot(&c, "proposals").await;

    // Try the hand-made proposal on a share of live traffic, then stop the trial.
    let manual = admin(&http, api("/v1/libraries/tips/proposals")).await;
    let manual_id = manual["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["origin"]["kind"] == "api")
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .expect("the hand-made proposal is pending");
    click(&c, &format!("[data-proposal='{manual_id}'] input.select")).await;
    click(&c, "#try-selected").await;
    wait_for(&c, "#canary-dialog[open]").await;
    set_value(&c, "#canary-share", "20").await;
    click(&c, "#canary-yes").await;
    let banner = wait_text(&c, "#canary", 30, |t| t.contains("20%")).await;
    assert!(banner.contains("1 proposal"), "{banner}");
    let trial = admin(&http, api("/v1/libraries/tips/canary")).await;
    assert_eq!(
        trial["current"]["candidate"]["proposals"],
        json!([manual_id]),
        "{trial}"
    );
    assert_eq!(trial["current"]["share"], 0.2, "{trial}");
    screenshot(&c, "canary").await;
    click(&c, "#stop-canary").await;
    wait_for(&c, "#confirm-dialog[open]").await;
    click(&c, "#confirm-yes").await;
    wait_gone(&c, "#canary").await;
    let trial = admin(&http, api("/v1/libraries/tips/canary")).await;
    assert!(trial["current"].is_null(), "{trial}");
    assert_eq!(trial["past"][0]["status"], "stopped", "{trial}");

    // Approve the learned proposal with an edit; reject the hand-made one.
    let edited = "Inside out: evaluate the innermost brackets first, then the rest.";
    type_into(&c, &format!("{card} textarea.proposal-text"), edited).await;
    click(&c, &format!("{card} button.approve")).await;
    wait_gone(&c, &card).await;
    click(&c, &format!("[data-proposal='{manual_id}'] button.reject")).await;
    wait_gone(&c, &format!("[data-proposal='{manual_id}']")).await;

    let all = admin(&http, api("/v1/libraries/tips/proposals?status=all")).await;
    let by_id = |id: &str| {
        all["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_id(&first)["status"], "approved");
    assert_eq!(by_id(&first)["decision"]["reviewer"], "ada");
    assert_eq!(by_id(&first)["decision"]["edited"], true);
    assert_eq!(by_id(&manual_id)["status"], "rejected");
    let exps = admin(&http, api("/v1/libraries/tips/experiences")).await;
    let learned = exps["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["text"] == edited)
        .cloned()
        .expect("the approved, edited proposal is live");
    assert_eq!(learned["source"], "learned");
    assert!(!exps.to_string().contains("Guess: when unsure"));

    // Its provenance: learned in the run, the step's groups, the review that let it in.
    let id = learned["id"].as_str().unwrap();
    goto(&c, &base, &format!("#/lib/tips/exp/{id}")).await;
    let prov = wait_text(&c, "#provenance", 30, |t| t.contains("learned")).await;
    assert!(prov.contains("in run tips-"), "{prov}");
    let history = wait_text(&c, "#history", 30, |t| t.contains("reviewed by ada")).await;
    assert!(history.contains("ADD"), "{history}");
    wait_for(&c, ".evidence .group").await;
    let group = wait_text(&c, ".evidence .group", 5, |_| true).await;
    assert!(
        group.contains("Question") && group.contains("Rewards"),
        "{group}"
    );
    screenshot(&c, "provenance").await;

    // Start a long job and cancel it from the browser.
    click(&c, "a[data-tab='learn']").await;
    set_value(&c, "#tasks", &tasks(24)).await;
    set_value(&c, "#learn-options", r#"{"max_tokens": 64}"#).await;
    type_into(&c, "#epochs", "5").await;
    click(&c, "#start-job").await;
    click(&c, "#jobs tbody tr:first-child button.cancel-job").await;
    wait_text(&c, "#jobs tbody tr:first-child .status", 60, |t| {
        t == "cancelled"
    })
    .await;
    let jobs = admin(&http, api("/v1/jobs")).await;
    assert!(
        jobs["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["status"] == "cancelled"),
        "{jobs}"
    );

    // Try it: the same prompt with and without the library, and what the library gave.
    click(&c, "a[data-tab='try']").await;
    type_into(&c, "#try-prompt", "What is not ( True ) and ( True )?").await;
    type_into(&c, "#try-max-tokens", "24").await;
    click(&c, "#try-send").await;
    let used = wait_text(&c, "#try-used", 120, |t| t.contains("Experiences used")).await;
    assert!(used.contains(id), "{used}");
    let with = wait_text(&c, "#try-with", 5, |_| true).await;
    assert!(!with.is_empty() && with != "…", "{with}");
    screenshot(&c, "try").await;

    // The libraries page, for the record.
    goto(&c, &base, "#/").await;
    wait_for(&c, "tr[data-lib='tips']").await;
    screenshot(&c, "libraries").await;
    assert!(errors_shown(&c).await.is_empty());

    // Deleting a library is confirmed first.
    click(&c, "tr[data-lib='tips'] button.delete-lib").await;
    wait_for(&c, "#confirm-dialog[open]").await;
    click(&c, "#confirm-yes").await;
    wait_gone(&c, "tr[data-lib='tips']").await;
    c.close().await.unwrap();
}
