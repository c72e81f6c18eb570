//! What the learning tests share: BBH boolean-expression tasks, the verifier they are scored
//! with, and learner prompts the embedded 135M model can follow.

use serde_json::{json, Value};

/// The lesson the learner prompts make the model write.
pub const LESSON: &str = "Inside out: Evaluate the innermost brackets first.";

/// An answer counts when it starts with the right word. Read exactly, the model's six-token
/// answers are right about 1 time in 12, so now and then all the attempts of a job scored 0
/// and no group was mixed; by first word they are right about 3 times in 10 (all 32 attempts
/// of a two-step job wrong: about 1 in 10^5).
pub const FIRST_WORD: &str = r"regex:(?i)^\W*{answer}\b";

/// The first `n` BBH boolean_expressions tasks as `{"question", "answer"}`: binary answers,
/// so attempts at temperature 1 disagree.
pub fn bool_tasks(n: usize) -> Vec<Value> {
    let root = env!("CARGO_MANIFEST_DIR");
    let data: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/tests/data/boolean_expressions.json")).unwrap(),
    )
    .unwrap();
    data["examples"].as_array().unwrap()[..n]
        .iter()
        .map(|e| json!({"question": e["input"], "answer": e["target"]}))
        .collect()
}

/// Writes learner prompts into `dir/prompts` and returns that directory, for
/// `EXPERIENT_PROMPTS_DIR`. The 135M model cannot write lessons or operations in the shipped
/// prompts' form, but it reliably repeats a short sentence under this system prompt, so these
/// make it repeat [`LESSON`] and an `ADD` of it, in the forms the learner's grammars hold
/// replies to (`ops::lessons_grammar`, `ops::operations_grammar`). Left as shipped, the consolidation prompt is
/// beyond it: its sampled retries invent changes now and then, which made tests flaky.
pub fn learner_prompts(dir: &std::path::Path) -> String {
    learner_prompts_saying(dir, LESSON)
}

/// [`learner_prompts`] that make the model write `lesson` instead.
pub fn learner_prompts_saying(dir: &std::path::Path, lesson: &str) -> String {
    let prompts = dir.join("prompts");
    std::fs::create_dir_all(&prompts).unwrap();
    for (file, text) in [
        (
            "learner_system.j2",
            "You repeat what the user says, word for word.".to_owned(),
        ),
        (
            "group_advantage.j2",
            format!("Say exactly:\n<lessons>\n{lesson}\n</lessons>"),
        ),
        (
            "group_update.j2",
            "Say exactly:\nADD: {{ lessons }}".to_owned(),
        ),
        (
            "batch_consolidate.j2",
            "Say exactly:\n{% if adds %}ADD: {{ adds[0] }}{% else %}NONE{% endif %}".to_owned(),
        ),
    ] {
        std::fs::write(prompts.join(file), text).unwrap();
    }
    prompts.display().to_string()
}
