//! Inbound API keys: user keys for the OpenAI routes, admin keys for libraries and jobs.

use crate::common;

use crate::common::{start, MODEL};
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessage, CreateChatCompletionRequestArgs,
};
use async_openai::Client;
use serde_json::Value;

#[tokio::test]
async fn keys_guard_the_routes() {
    let server = start(
        Some("[auth]\napi_keys = [\"user-key\"]\n"),
        &[("EXPERIENT_ADMIN_KEYS", "admin-key,second-admin")],
    );
    let client = |key: &str| {
        Client::with_config(
            OpenAIConfig::new()
                .with_api_base(format!("{}/v1", server.base))
                .with_api_key(key),
        )
    };
    let req = CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .messages(vec![ChatCompletionRequestUserMessage::from("Hi").into()])
        .max_completion_tokens(2u32)
        .temperature(0.0)
        .build()
        .unwrap();
    // A user key and an admin key both serve chat; a wrong key does not.
    assert!(client("user-key").chat().create(req.clone()).await.is_ok());
    assert!(client("second-admin")
        .chat()
        .create(req.clone())
        .await
        .is_ok());
    match client("wrong")
        .chat()
        .create(req.clone())
        .await
        .unwrap_err()
    {
        async_openai::error::OpenAIError::ApiError(e) => {
            assert_eq!(e.status_code.as_u16(), 401);
            assert_eq!(e.api_error.r#type.as_deref(), Some("authentication_error"));
        }
        other => panic!("{other:?}"),
    }

    let http = reqwest::Client::new();
    let get = |path: &str, key: Option<&str>| {
        let mut r = http.get(server.url(path));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        async move {
            let r = r.send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    // No key at all: 401 in the envelope; health stays open, metrics need a key.
    let (s, body) = get("/v1/models", None).await;
    assert_eq!(s, 401);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Bearer"));
    assert_eq!(get("/health", None).await.0, 200);
    // The API's description is public, and lists every route.
    let (s, doc) = get("/openapi.json", None).await;
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in [
        "/v1/chat/completions",
        "/v1/libraries/{name}/experiences/{id}",
        "/v1/jobs/{id}",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
    assert_eq!(common::http_status(&server.url("/metrics")).unwrap(), 401);
    assert_eq!(get("/metrics", Some("user-key")).await.0, 200);
    assert_eq!(get("/v1/models", Some("user-key")).await.0, 200);
    // Admin routes: user key 403, admin key 200.
    let (s, body) = get("/v1/libraries", Some("user-key")).await;
    assert_eq!(s, 403);
    assert_eq!(body["error"]["type"], "permission_error");
    assert_eq!(get("/v1/libraries", Some("admin-key")).await.0, 200);
    assert_eq!(get("/v1/libraries", None).await.0, 401);
}
