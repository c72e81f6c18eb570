//! Experiences found by meaning, on the real server with the real embedding model: a question
//! that shares no word with its lesson finds it (hybrid), where words alone do not; the prior
//! puts pinned lessons first and reports how it retrieved; a manual add that repeats a lesson
//! is flagged, and refused with `?dedupe=true`.

use crate::common::{call, shared, MODEL};
use serde_json::{json, Value};

/// Lessons on unrelated topics, and for some a question that means the same in other words.
const LESSONS: [&str; 12] = [
    "Units: convert every quantity to one unit before adding or comparing them.",
    "Percentages: a percent of an amount is the amount times the percent divided by one hundred.",
    "Parity: the sum of two odd integers is always even.",
    "Calendars: count the days of each month when moving a date forward.",
    "Rates: distance equals speed multiplied by time.",
    "Money: work in cents so that sums of prices carry no rounding error.",
    "Geometry: the area of a rectangle is its length times its width.",
    "Probability: independent chances multiply.",
    "Negation: a statement and its negation cannot both be true.",
    "Ordering: sort the items first when asked for the middle value.",
    "Spelling: count letters one at a time, writing each one down.",
    "Clocks: add minutes past sixty as whole hours.",
];

async fn ok(method: &str, path: &str, body: Option<Value>) -> Value {
    let (s, v) = call(method, &shared().url(path), body.as_ref()).await;
    assert!((200..300).contains(&s), "{method} {path}: {s} {v}");
    v
}

/// A library of [`LESSONS`], once every lesson has its vector.
async fn library(name: &str) -> Vec<String> {
    ok("POST", "/v1/libraries", Some(json!({"name": name}))).await;
    let mut ids = Vec::new();
    for text in LESSONS {
        let e = ok(
            "POST",
            &format!("/v1/libraries/{name}/experiences"),
            Some(json!({"text": text})),
        )
        .await;
        ids.push(e["id"].as_str().unwrap().to_owned());
    }
    for _ in 0..300 {
        let lib = ok("GET", &format!("/v1/libraries/{name}"), None).await;
        if lib["vectors"]["count"] == LESSONS.len() {
            assert_eq!(lib["vectors"]["model"], "all-minilm-l6-v2");
            assert_eq!(lib["vectors"]["search"], "exact");
            return ids;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the lessons of {name} were never embedded");
}

/// The ids a completion's `experient` object says were injected.
fn injected(r: &Value) -> Vec<&str> {
    r["experient"]["experiences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

async fn search(name: &str, q: &str, mode: &str) -> Vec<Value> {
    let url = shared().url(&format!("/v1/libraries/{name}/experiences"));
    let url =
        reqwest::Url::parse_with_params(&url, [("q", q), ("mode", mode), ("limit", "3")]).unwrap();
    let (s, v) = call("GET", url.as_str(), None).await;
    assert_eq!(s, 200, "{v}");
    v["data"].as_array().unwrap().clone()
}

#[tokio::test]
async fn a_question_finds_its_lesson_by_meaning_where_words_alone_do_not() {
    let ids = library("meaning").await;
    // No word in common with "Parity: the sum of two odd integers is always even."
    let q = "Adding 7 and 9: would that total be divisible by 2?";
    let lexical = search("meaning", q, "lexical").await;
    assert!(
        lexical.iter().all(|h| h["id"] != ids[2].as_str()),
        "{lexical:?}"
    );
    let semantic = search("meaning", q, "semantic").await;
    assert_eq!(semantic[0]["id"], ids[2].as_str(), "{semantic:?}");
    assert!(semantic[0]["similarity"].as_f64().unwrap() > 0.3);
    let hybrid = search("meaning", q, "hybrid").await;
    assert!(
        hybrid.iter().any(|h| h["id"] == ids[2].as_str()),
        "{hybrid:?}"
    );
    // Words and meaning both: the lexical score and the similarity are both reported.
    let both = search(
        "meaning",
        "how many days from the 30th of one month",
        "hybrid",
    )
    .await;
    assert_eq!(both[0]["id"], ids[3].as_str(), "{both:?}");
    assert!(both[0]["lexical"].is_number() && both[0]["similarity"].is_number());
    // Nothing alike: the minimum similarity leaves the prior empty rather than padded.
    let none = search("meaning", "Who painted the Mona Lisa?", "semantic").await;
    assert!(none.is_empty(), "{none:?}");
    let (s, v) = call(
        "GET",
        &shared().url("/v1/libraries/meaning/experiences?q=x&min_score=2"),
        None,
    )
    .await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("min_score")));
}

#[tokio::test]
async fn the_prior_puts_pinned_lessons_first_and_retrieves_the_rest_by_meaning() {
    let ids = library("prior").await;
    let mut settings = ok("GET", "/v1/libraries/prior", None).await["settings"].clone();
    settings["pinned"] = json!([ids[9]]);
    ok("PATCH", "/v1/libraries/prior", Some(settings)).await;
    let ask = |extra: Value| {
        let mut body = json!({
            "model": format!("{MODEL}@prior"),
            "messages": [{"role": "user", "content": "A car goes 60 km an hour for 3 hours; how far does it get?"}],
            "max_tokens": 2,
        });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    // Twelve lessons are past `whole_up_to` (8): `auto` retrieves the top 4 after the pin.
    let r = ok("POST", "/v1/chat/completions", Some(ask(json!({})))).await;
    let got = injected(&r);
    // The speed lesson shares no word with the question: it is there by meaning.
    assert_eq!(got[0], ids[9], "{got:?}");
    assert!(got[1..].contains(&ids[4].as_str()), "{got:?}");
    assert!(got.len() <= 5, "{got:?}");
    assert_eq!(r["experient"]["retrieval"], "hybrid");

    // Per request: words alone, and a bad override refused by its field.
    let r = ok(
        "POST",
        "/v1/chat/completions",
        Some(ask(
            json!({"experient": {"retrieval": {"mode": "lexical"}}}),
        )),
    )
    .await;
    assert_eq!(r["experient"]["retrieval"], "lexical");
    let words = injected(&r);
    assert_eq!(words[0], ids[9]);
    assert!(!words.contains(&ids[4].as_str()), "{words:?}");
    let (s, v) = call(
        "POST",
        &shared().url("/v1/chat/completions"),
        Some(&ask(json!({"experient": {"retrieval": {"diversity": -1}}}))),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["param"], "experient.retrieval.diversity");
}

#[tokio::test]
async fn a_lesson_said_again_is_flagged_and_refused_on_request() {
    let ids = library("dupes").await;
    let again = "Parity: adding two odd integers always gives an even number.";
    let path = "/v1/libraries/dupes/experiences";
    let (s, v) = call(
        "POST",
        &shared().url(&format!("{path}?dedupe=true")),
        Some(&json!({"text": again})),
    )
    .await;
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains(&ids[2]),
        "{v}"
    );
    let kept = ok("POST", path, Some(json!({"text": again}))).await;
    assert_eq!(kept["near_duplicates"][0]["id"], ids[2].as_str(), "{kept}");
    assert!(kept["near_duplicates"][0]["similarity"].as_f64().unwrap() >= 0.9);
    // Something new is neither flagged nor refused.
    let new = ok(
        "POST",
        &format!("{path}?dedupe=true"),
        Some(json!({"text": "Fractions: find a common denominator before adding."})),
    )
    .await;
    assert!(new.get("near_duplicates").is_none(), "{new}");
}
