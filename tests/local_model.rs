//! How the local backend loads a Q4_1 GGUF: as it is by default (candle's patched AVX2 Q4_1
//! kernel keeps the file's own greedy output), rewritten as Q8_0 beside it only when
//! `requantize_q4_1` asks. Each way a real server loads a copy of the embedded model and
//! answers through an OpenAI client.

mod common;

use async_openai::types::chat::{
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
