//! How the local backend loads a Q4_1 GGUF: as it is by default (candle's patched AVX2 Q4_1
//! kernel keeps the file's own greedy output), rewritten as Q8_0 beside it only when
//! `requantize_q4_1` asks. Each way a real server loads a copy of the embedded model and
//! answers through an OpenAI client.

use crate::common;

use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessageArgs, ChatCompletionRequestMessage,
    ChatCompletionRequestUserMessage, CreateChatCompletionRequestArgs,
};

#[tokio::test]
async fn q4_1_is_served_as_is_unless_the_q8_0_rewrite_is_asked_for() {
    let cache = std::env::var("EXPERIENT_MODEL_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| experient::backend::fetch::default_cache_dir());
    let source = experient::backend::fetch::ensure_default_model(&cache).unwrap();
    for (setting, rewritten) in [("", false), ("requantize_q4_1 = true\n", true)] {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("model.gguf");
        std::fs::copy(&source, &gguf).unwrap();
        let rewrite = dir.path().join("model.q8_0-from-q4_1.gguf");
        let config = format!(
            "[[models]]\nkind = \"local\"\nid = \"m\"\ngguf = \"{}\"\n{setting}",
            gguf.display()
        );
        let s = common::start_in(dir, Some(&config), &[]);
        let req = CreateChatCompletionRequestArgs::default()
            .model("m")
            .messages(vec![ChatCompletionRequestUserMessage::from("Hi").into()])
            .max_completion_tokens(4u32)
            .temperature(0.0)
            .build()
            .unwrap();
        let resp = s.client().chat().create(req).await.unwrap();
        let usage = resp.usage.expect("usage");
        assert!(usage.completion_tokens > 0, "{setting:?}: {usage:?}");
        assert_eq!(rewrite.exists(), rewritten, "{setting:?}");
    }
}

/// The prefix cache (`prefix_cache`) lets a request that starts with a finished request's
/// tokens prefill only the rest. It must not change what the model says: the same requests
/// under one library prior, greedy, give the same text with the cache off and on, including
/// repeats that hit the cache, a question asked twice, and a second turn of the first
/// conversation, whose tokens match the first request's past the prior (keys and values that a
/// later request sharing only the prior must not have overwritten).
#[tokio::test]
async fn the_prefix_cache_changes_no_greedy_output() {
    let questions = [
        "A shirt costs $20 and is 25% off. What does it cost?",
        "What is 15% of 80?",
        "A shirt costs $20 and is 25% off. What does it cost?",
        "If 4 pens cost $6, what do 10 pens cost?",
    ];
    let mut texts = Vec::new();
    for cache in [0, 4] {
        let config = format!(
            "[[models]]\nkind = \"local\"\nid = \"{}\"\nprefix_cache = {cache}\n",
            common::MODEL
        );
        let s = common::start(Some(&config), &[]);
        let http = reqwest::Client::new();
        http.post(s.url("/v1/libraries"))
            .json(&serde_json::json!({"name": "math"}))
            .send()
            .await
            .unwrap();
        for i in 0..12 {
            http.post(s.url("/v1/libraries/math/experiences"))
                .json(&serde_json::json!({"text": format!(
                    "Rule {i}: turn every quantity into one unit, then multiply groups by their size before adding the rest."
                )}))
                .send()
                .await
                .unwrap();
        }
        let mut out = Vec::new();
        let ask = |messages: Vec<ChatCompletionRequestMessage>| {
            let req = CreateChatCompletionRequestArgs::default()
                .model(format!("{}@math", common::MODEL))
                .messages(messages)
                .max_completion_tokens(24u32)
                .temperature(0.0)
                .build()
                .unwrap();
            let client = s.client();
            async move {
                let resp = client.chat().create(req).await.unwrap();
                resp.choices[0].message.content.clone().unwrap_or_default()
            }
        };
        // The second turn of the first conversation comes right after a request that shared
        // only the prior, while the first request's entry is still the one it matches.
        for q in &questions[..2] {
            out.push(ask(vec![ChatCompletionRequestUserMessage::from(*q).into()]).await);
        }
        let second_turn = vec![
            ChatCompletionRequestUserMessage::from(questions[0]).into(),
            ChatCompletionRequestAssistantMessageArgs::default()
                .content(out[0].clone())
                .build()
                .unwrap()
                .into(),
            ChatCompletionRequestUserMessage::from("And if it were 50% off?").into(),
        ];
        out.push(ask(second_turn).await);
        for q in &questions[2..] {
            out.push(ask(vec![ChatCompletionRequestUserMessage::from(*q).into()]).await);
        }
        texts.push(out);
    }
    assert!(texts[0].iter().all(|t| !t.is_empty()), "{texts:?}");
    assert_eq!(texts[0], texts[1], "output with the prefix cache differs");
}

/// One greedy request with log probabilities: its prompt's token count and each generated
/// token with its log probability, for comparing runs bit for bit.
async fn greedy(
    client: async_openai::Client<async_openai::config::OpenAIConfig>,
    prompt: String,
    max_tokens: u32,
) -> (u32, Vec<(String, f32)>) {
    let req = CreateChatCompletionRequestArgs::default()
        .model(common::MODEL)
        .messages(vec![ChatCompletionRequestUserMessage::from(prompt).into()])
        .max_completion_tokens(max_tokens)
        .temperature(0.0)
        .logprobs(true)
        .build()
        .unwrap();
    let r = client.chat().create(req).await.unwrap();
    let prompt_tokens = r.usage.unwrap().prompt_tokens;
    let tokens = r.choices[0]
        .logprobs
        .as_ref()
        .and_then(|l| l.content.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.token, t.logprob))
        .collect();
    (prompt_tokens, tokens)
}

/// A greedy answer is the same whatever else the engine is decoding beside it: requests of one
/// prompt length share decoding batches, and a batch's members finish at different times. The
/// tokens and their log probabilities, bit for bit, are those of each request run alone. Before
/// the scheduler fix in `vendor/mistralrs-core`, a request set aside for a shorter bucket was
/// prefilled again from all its tokens whenever the running ones finished, and its later
/// log probabilities (and, some steps on, its text) drifted.
#[tokio::test]
async fn batched_greedy_output_is_the_same_as_alone() {
    let config = format!(
        "[[models]]\nkind = \"local\"\nid = \"{}\"\nmax_seqs = 8\nprefix_cache = 0\n",
        common::MODEL
    );
    let s = common::start(Some(&config), &[]);
    let client = s.client();
    let ask = |subject: &str, max_tokens: u32| {
        greedy(
            client.clone(),
            format!("Tell me a story about a {subject}."),
            max_tokens,
        )
    };
    let subjects = ["cat", "dog", "king", "ship"];
    let mut alone = Vec::new();
    for subject in subjects {
        alone.push(ask(subject, 192).await);
    }
    assert!(
        alone.iter().all(|(p, _)| *p == alone[0].0),
        "the prompts must have one length, or they never share a batch"
    );
    // All at once, then arriving 150 ms apart with different lengths, so that requests finish
    // while others are still decoding in another bucket (the drift showed only in contexts
    // past about 100 tokens, hence the lengths).
    for stagger in [None, Some(std::time::Duration::from_millis(150))] {
        let mut tasks = Vec::new();
        for (i, subject) in subjects.iter().enumerate() {
            let max_tokens = if stagger.is_some() {
                48 * (i as u32 + 1)
            } else {
                96
            };
            tasks.push(tokio::spawn(ask(subject, max_tokens)));
            if let Some(d) = stagger {
                tokio::time::sleep(d).await;
            }
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let (_, batched) = t.await.unwrap();
            let reference = &alone[i].1[..batched.len()];
            assert!(!batched.is_empty());
            assert_eq!(
                batched, reference,
                "{}: batched output differs from the request alone ({stagger:?})",
                subjects[i]
            );
        }
    }
}

/// Chunked prefill (`prefill_chunk`) runs a long prompt a piece at a time, with the other
/// requests' decoding steps between the pieces. It must not change what any request says: a
/// prompt several chunks long, alone and arriving while three short requests decode, gives the
/// same tokens and log probabilities, bit for bit, with chunks of 16 tokens as in one piece,
/// and so do the requests it interrupted.
#[tokio::test]
async fn chunked_prefill_changes_no_greedy_output() {
    let notes: Vec<String> = (0..12)
        .map(|i| {
            format!(
                "Note {i}: the ferry from pier {} leaves at {} o'clock.",
                i % 5,
                6 + i
            )
        })
        .collect();
    let long = format!("{}\nWhich pier has the most ferries?", notes.join("\n"));
    let mut runs = Vec::new();
    for chunk in [0, 16] {
        let config = format!(
            "[[models]]\nkind = \"local\"\nid = \"{}\"\nmax_seqs = 8\nprefix_cache = 0\nprefill_chunk = {chunk}\n",
            common::MODEL
        );
        let s = common::start(Some(&config), &[]);
        let client = s.client();
        let ask = |prompt: String, max_tokens: u32| greedy(client.clone(), prompt, max_tokens);
        let mut out = vec![ask(long.clone(), 24).await];
        let mut decoding = Vec::new();
        for subject in ["cat", "ship", "king"] {
            decoding.push(tokio::spawn(ask(
                format!("Tell me a story about a {subject}."),
                96,
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        out.push(ask(long.clone(), 24).await);
        for t in decoding {
            out.push(t.await.unwrap());
        }
        runs.push(out);
    }
    let long_tokens = runs[0][0].0;
    assert!(
        long_tokens > 5 * 16,
        "the prompt must span several chunks: {long_tokens} tokens"
    );
    assert!(runs[0].iter().all(|(_, t)| !t.is_empty()), "{:?}", runs[0]);
    assert_eq!(
        runs[0][0], runs[0][1],
        "the long prompt's answer depends on what else decodes"
    );
    assert_eq!(runs[0], runs[1], "output with chunked prefill differs");
}

/// CPU seconds a process has used, user and system, from /proc (in clock ticks of 1/100 s,
/// which is what Linux reports to user space).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

/// A client that leaves while its long prompt is being prefilled stops that prefill at the
/// next chunk. mistral.rs cancels a sequence when sending it a token fails, which would be
/// only after the whole prefill (about 20 s of both cores for this prompt here). Seen as the
/// server's CPU time once the client has gone: an idle server uses next to none.
#[tokio::test]
async fn a_client_that_leaves_stops_its_prefill() {
    let config = format!(
        "[[models]]\nkind = \"local\"\nid = \"{}\"\nprefix_cache = 0\nprefill_chunk = 64\n",
        common::MODEL
    );
    let s = common::start(Some(&config), &[]);
    let notes: String = (0..120)
        .map(|i| {
            format!(
                "Note {i}: the ferry from pier {} leaves at {}.\n",
                i % 7,
                6 + i % 12
            )
        })
        .collect();
    let body = serde_json::json!({
        "model": common::MODEL,
        "messages": [{"role": "user", "content": notes}],
        "max_tokens": 8,
        "stream": true,
    });
    let request = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send();
    // The client gives up after a second, well inside the prefill, and its connection closes.
    let gave_up = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        request.await.unwrap().bytes().await
    })
    .await;
    assert!(gave_up.is_err(), "the prefill ended within a second");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let before = cpu_seconds(s.pid);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let used = cpu_seconds(s.pid) - before;
    assert!(
        used < 1.0,
        "the server went on working for a client that left: {used} CPU s in 3 s"
    );

    let req = CreateChatCompletionRequestArgs::default()
        .model(common::MODEL)
        .messages(vec![ChatCompletionRequestUserMessage::from("Hi").into()])
        .max_completion_tokens(4u32)
        .build()
        .unwrap();
    let resp = s.client().chat().create(req).await.unwrap();
    assert!(resp.usage.unwrap().completion_tokens > 0);
}
