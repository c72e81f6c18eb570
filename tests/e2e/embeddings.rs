//! `/v1/embeddings` on the real embedded embedding model (all-MiniLM-L6-v2), through the
//! async-openai client in both encodings and through raw HTTP where errors are under test.
//! The vectors' numbers are held to an independent NumPy implementation by
//! `bench/embedding_reference.py`; here, what a user relies on: unit vectors, meaning over
//! wording, the same vector whatever the batch, and OpenAI's errors.

use crate::common::shared;
use async_openai::types::embeddings::{CreateEmbeddingRequestArgs, EmbeddingInput, EncodingFormat};
use serde_json::{json, Value};

const MODEL: &str = "all-minilm-l6-v2";

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test]
async fn a_paraphrase_is_nearer_than_another_topic_whatever_the_batch() {
    let texts = [
        "How do I reset my password?",
        "I forgot my login credentials and need to change them.",
        "The recipe needs two cups of flour.",
    ];
    let req = CreateEmbeddingRequestArgs::default()
        .model(MODEL)
        .input(EmbeddingInput::StringArray(
            texts.iter().map(|t| t.to_string()).collect(),
        ))
        .build()
        .unwrap();
    let r = shared().client().embeddings().create(req).await.unwrap();
    assert_eq!(r.model, MODEL);
    assert_eq!(r.data.len(), 3);
    assert!(r.usage.prompt_tokens > 10 && r.usage.prompt_tokens == r.usage.total_tokens);
    let v: Vec<&Vec<f32>> = r.data.iter().map(|d| &d.embedding).collect();
    for (i, d) in r.data.iter().enumerate() {
        assert_eq!(d.index as usize, i);
        assert_eq!(d.embedding.len(), 384);
        assert!((dot(&d.embedding, &d.embedding) - 1.0).abs() < 1e-4);
    }
    let (same, other) = (dot(v[0], v[1]), dot(v[0], v[2]));
    assert!(
        same > 0.4 && other < 0.2 && same > other + 0.3,
        "{same} {other}"
    );

    // Alone, and in base64 (the openai SDK's default encoding): the same vector.
    let alone = CreateEmbeddingRequestArgs::default()
        .model(MODEL)
        .input(texts[2])
        .encoding_format(EncodingFormat::Base64)
        .build()
        .unwrap();
    let b = shared()
        .client()
        .embeddings()
        .create_base64(alone)
        .await
        .unwrap();
    let decoded: Vec<f32> = b.data[0].embedding.clone().into();
    let diff = decoded
        .iter()
        .zip(v[2])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-5, "batched and alone differ by {diff}");
}

#[tokio::test]
async fn token_ids_are_this_model_s_and_the_errors_are_openai_s() {
    let http = reqwest::Client::new();
    let post = |body: Value| {
        let http = http.clone();
        async move {
            let r = http
                .post(shared().url("/v1/embeddings"))
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    // Token ids of "hello world" in MiniLM's vocabulary embed as the text does.
    let (s, ids) = post(json!({"model": MODEL, "input": [[7592, 2088], "hello world"]})).await;
    assert_eq!(s, 200, "{ids}");
    let vec = |i: usize| -> Vec<f32> {
        serde_json::from_value(ids["data"][i]["embedding"].clone()).unwrap()
    };
    let (a, b) = (vec(0), vec(1));
    assert!(dot(&a, &b) > 0.9999, "{}", dot(&a, &b));

    for (body, status, param) in [
        (json!({"model": MODEL, "input": []}), 400, "input"),
        (json!({"model": MODEL, "input": ["a", ""]}), 400, "input[1]"),
        (json!({"model": MODEL, "input": [[1, -2]]}), 400, "input[0]"),
        (
            json!({"model": MODEL, "input": [[99999999]]}),
            400,
            "input[0]",
        ),
        (
            json!({"model": MODEL, "input": "word ".repeat(600)}),
            400,
            "input[0]",
        ),
        (
            json!({"model": MODEL, "input": "a", "dimensions": 64}),
            400,
            "dimensions",
        ),
        (
            json!({"model": MODEL, "input": "a", "encoding_format": "hex"}),
            400,
            "encoding_format",
        ),
        (json!({"model": "nope", "input": "a"}), 404, "model"),
        (
            json!({"model": MODEL, "input": "a", "truncate": true}),
            400,
            "truncate",
        ),
    ] {
        let (s, e) = post(body.clone()).await;
        assert_eq!(s, status, "{body} -> {e}");
        assert_eq!(e["error"]["param"], param, "{body} -> {e}");
    }
    // The native size is not a shortening, so it is taken.
    let (s, _) = post(json!({"model": MODEL, "input": "a", "dimensions": 384})).await;
    assert_eq!(s, 200);
    // What was embedded is counted for operators.
    let text = crate::common::get_text(&shared().url("/metrics")).await;
    let count = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{model=\"{MODEL}\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(count("experient_embedding_inputs_total") >= 3.0, "{text}");
    assert!(count("experient_embedding_tokens_total") >= 3.0, "{text}");
}

#[tokio::test]
async fn an_upstream_s_embeddings_come_back_under_this_server_s_name() {
    let up = shared();
    let front = crate::common::start(
        Some(&format!(
            "[embeddings]\nid = \"minilm-up\"\nbase_url = \"{}/v1\"\nmodel = \"{MODEL}\"\n",
            up.base
        )),
        &[],
    );
    let http = reqwest::Client::new();
    let post = |base: String, body: Value| {
        let http = http.clone();
        async move {
            let r = http
                .post(format!("{base}/v1/embeddings"))
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let texts = json!(["a cat sat on the mat", "the weather is cold"]);
    let (s, via) = post(
        front.base.clone(),
        json!({"model": "minilm-up", "input": texts}),
    )
    .await;
    assert_eq!(s, 200, "{via}");
    assert_eq!(via["model"], "minilm-up");
    let (_, direct) = post(up.base.clone(), json!({"model": MODEL, "input": texts})).await;
    assert_eq!(via["data"], direct["data"]);
    assert_eq!(via["usage"], direct["usage"]);
    // Shape and name are checked here; what only the model knows, the upstream answers.
    let (s, e) = post(
        front.base.clone(),
        json!({"model": "minilm-up", "input": []}),
    )
    .await;
    assert_eq!((s, e["error"]["param"].as_str()), (400, Some("input")));
    let (s, e) = post(
        front.base.clone(),
        json!({"model": "minilm-up", "input": "a", "dimensions": 64}),
    )
    .await;
    assert_eq!(
        (s, e["error"]["param"].as_str()),
        (400, Some("dimensions")),
        "{e}"
    );
    let (s, _) = post(front.base.clone(), json!({"model": MODEL, "input": "a"})).await;
    assert_eq!(s, 404);
}
