//! A client's JSON Schema as the local backend holds the model to it.
//!
//! A schema read as JSON Schema says little about the text: whitespace anywhere, any extra key
//! on an object that does not forbid them, digits without end. A small model given that much
//! room pretty-prints, copies the schema's own words into the object as extra keys, and runs an
//! integer until the tokens run out, so an ordinary (non-strict) tool schema came back as a
//! cut-off text instead of a call. Decoding therefore narrows it to what clients mean: compact
//! JSON, only the properties the schema names (unless it asks for others), and numbers of a
//! sensible size. Every value it allows is still valid against the client's schema.

use serde_json::{json, Value};

/// The largest integer a JSON number holds exactly (2^53 - 1); unbounded integers are held to
/// it, so an integer is at most 16 digits rather than a digit stream.
const MAX_SAFE_INTEGER: i64 = 9_007_199_254_740_991;

/// Keys whose values are data, not schemas: never rewritten.
const DATA_KEYS: [&str; 4] = ["const", "enum", "default", "examples"];

/// The schema with decoding options for llguidance (compact separators, no free whitespace,
/// unless the schema sets its own), `additionalProperties: false` on every object schema that
/// names properties and says nothing of others, and bounds on unbounded integers and numbers.
/// Walks the schema with a stack, not recursion: the schema is the client's.
pub fn for_decoding(mut schema: Value) -> Value {
    // Each value with whether it may be closed to other keys: an `allOf` member may not, since
    // the keys it leaves out are its siblings' to name.
    let mut stack: Vec<(&mut Value, bool)> = vec![(&mut schema, true)];
    while let Some((v, closable)) = stack.pop() {
        match v {
            Value::Object(o) => {
                narrow(o, closable);
                for (k, v) in o.iter_mut() {
                    match (k.as_str(), v) {
                        (k, _) if DATA_KEYS.contains(&k) => {}
                        ("allOf", Value::Array(members)) => {
                            stack.extend(members.iter_mut().map(|m| (m, false)))
                        }
                        (_, v) => stack.push((v, true)),
                    }
                }
            }
            Value::Array(items) => stack.extend(items.iter_mut().map(|i| (i, true))),
            _ => {}
        }
    }
    if let Value::Object(o) = &mut schema {
        o.entry("x-guidance")
            .or_insert_with(|| json!({"whitespace_flexible": false}));
    }
    schema
}

/// One object schema narrowed in place.
fn narrow(o: &mut serde_json::Map<String, Value>, closable: bool) {
    let names_properties = closable && o.get("properties").is_some_and(Value::is_object);
    let open_ended = [
        "additionalProperties",
        "patternProperties",
        "unevaluatedProperties",
    ]
    .iter()
    .any(|k| o.contains_key(*k));
    if names_properties && !open_ended {
        o.insert("additionalProperties".into(), Value::Bool(false));
    }
    let kind = |t: &str| match o.get("type") {
        Some(Value::String(s)) => s == t,
        Some(Value::Array(a)) => a.iter().any(|x| x == t),
        _ => false,
    };
    if kind("integer") || kind("number") {
        for (key, exclusive, bound) in [
            ("minimum", "exclusiveMinimum", -MAX_SAFE_INTEGER),
            ("maximum", "exclusiveMaximum", MAX_SAFE_INTEGER),
        ] {
            if !o.contains_key(key) && !o.contains_key(exclusive) {
                o.insert(key.into(), json!(bound));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ordinary_schema_is_narrowed_and_a_strict_one_kept() {
        let s = for_decoding(json!({
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "population": {"type": "integer"},
                "size": {"type": ["number", "null"], "minimum": 0},
                "tags": {"type": "array", "items": {"type": "object", "properties": {"k": {}}}},
                "extra": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "enum": [{"properties": {"left": "alone"}}],
            "allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}],
        }));
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["x-guidance"], json!({"whitespace_flexible": false}));
        let p = &s["properties"];
        assert_eq!(p["population"]["maximum"], MAX_SAFE_INTEGER);
        assert_eq!(p["population"]["minimum"], -MAX_SAFE_INTEGER);
        assert_eq!(p["size"]["minimum"], 0);
        assert_eq!(p["size"]["maximum"], MAX_SAFE_INTEGER);
        assert_eq!(p["tags"]["items"]["additionalProperties"], false);
        assert_eq!(
            p["extra"]["additionalProperties"],
            json!({"type": "string"})
        );
        assert!(p["city"].get("additionalProperties").is_none());
        // allOf members stay open: each names only some of the keys.
        assert!(s["allOf"][0].get("additionalProperties").is_none());
        // Data is not a schema.
        assert_eq!(s["enum"][0], json!({"properties": {"left": "alone"}}));
    }

    #[test]
    fn a_schema_with_its_own_decoding_options_keeps_them() {
        let own = json!({"whitespace_flexible": true});
        let s = for_decoding(json!({"type": "object", "x-guidance": own}));
        assert_eq!(s["x-guidance"], own);
    }

    #[test]
    fn a_deep_schema_is_walked_without_recursion() {
        let mut s = json!({"type": "integer"});
        for _ in 0..10_000 {
            // Built by hand: `json!` would copy `s` by serializing it, recursively.
            let mut o = serde_json::Map::new();
            o.insert("type".into(), "array".into());
            o.insert("items".into(), s);
            s = Value::Object(o);
        }
        let s = for_decoding(s);
        assert_eq!(s["x-guidance"], json!({"whitespace_flexible": false}));
        // Dropping a value this deep recurses in serde_json's own Drop; keep it off this
        // thread's stack by leaking it, since the test is over.
        std::mem::forget(s);
    }
}
