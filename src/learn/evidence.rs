//! The evidence behind a learned change, read back from its run directory: the tasks of the
//! step, each group's attempts with their rewards, the learner's comparison of them and the
//! operations it proposed, and how the step's proposals were merged.
//!
//! A person deciding whether a learned rule may go live (or why one exists) needs to see what
//! it was learned from; the run directory already holds all of it, so nothing is duplicated
//! into the library.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::grpo::{Consolidation, GroupRecord, Rollout, RunInfo};
use super::ops::Proposal;

/// Longest attempt output shown; attempts can run to thousands of tokens.
const MAX_OUTPUT_CHARS: usize = 4000;

/// Run ids come from provenance, which an import can carry, so they are checked before they
/// become a path.
fn safe_run_id(run: &str) -> bool {
    !run.is_empty()
        && run.len() <= 200
        && !run.starts_with('.')
        && run
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A record as the learner wrote it, in the learner's own types.
fn read<T: DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn cut(s: &str) -> String {
    match s.char_indices().nth(MAX_OUTPUT_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// What step `step` of run `run` learned from, for a change with `text` (an add or update)
/// or on experience `id` (an update or delete). `None` when the run's records are gone (a
/// run directory removed by hand, or a library imported from elsewhere).
pub fn step_evidence(
    runs_dir: &Path,
    run: &str,
    step: u64,
    text: Option<&str>,
    id: Option<&str>,
) -> Option<Value> {
    if !safe_run_id(run) {
        return None;
    }
    let dir = runs_dir.join(run);
    let info: RunInfo = read(&dir.join("run.json"))?;
    let step_dir = dir.join(format!("step-{step:04}"));
    let groups: Vec<GroupRecord> = read(&step_dir.join("groups.json")).unwrap_or_default();
    let rollouts: Vec<Rollout> = std::fs::read_to_string(step_dir.join("rollouts.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let matches = |p: &Proposal| {
        text.is_some_and(|t| p.text.as_deref() == Some(t))
            || id.is_some_and(|i| p.id.as_deref() == Some(i))
    };
    let out: Vec<Value> = groups
        .iter()
        .filter(|g| !g.proposals.is_empty())
        .map(|g| group_view(g, &rollouts, g.proposals.iter().any(matches)))
        .collect();
    let consolidation: Option<Consolidation> = read(&step_dir.join("consolidation.json"));
    let o = &info.options;
    Some(json!({
        "run": run,
        "step": step,
        "dataset": info.dataset,
        "model": o.model,
        "learner_model": o.learner_model,
        "verifier": o.verifier.as_deref().unwrap_or(&info.default_verifier),
        "produced_by_group": out.iter().any(|g| g["produced"] == json!(true)),
        "groups": out,
        "consolidation": consolidation.map(|c| json!({
            "reply": c.reply,
            "result": c.result,
            "fallback": c.fallback,
        })),
    }))
}

/// One group as a reviewer reads it: the task, every attempt and its reward, and what the
/// learner made of them.
fn group_view(g: &GroupRecord, rollouts: &[Rollout], produced: bool) -> Value {
    let attempts: Vec<Value> = rollouts
        .iter()
        .filter(|r| r.task == g.task)
        .map(|r| {
            json!({
                "attempt": r.attempt,
                "reward": r.reward,
                "output": cut(&r.output),
                "critique": r.critique,
                "error": r.error,
            })
        })
        .collect();
    json!({
        "task": g.task,
        "question": g.question,
        "answer": g.answer,
        "rewards": g.rewards,
        "attempts": attempts,
        "comparison": g.advantage_reply,
        "lessons": g.lessons,
        "operations_reply": g.update_reply,
        "proposals": g.proposals,
        "produced": produced,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_id_cannot_leave_the_runs_directory() {
        assert!(safe_run_id("lib-20261201T000000-abc123"));
        for bad in ["", "..", "../etc", "a/b", ".hidden", "a\\b"] {
            assert!(!safe_run_id(bad), "{bad}");
        }
    }

    #[test]
    fn evidence_names_the_group_that_proposed_the_text() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("r1");
        std::fs::create_dir_all(run.join("step-0001")).unwrap();
        let info = RunInfo {
            id: "r1".into(),
            created: chrono::Utc::now(),
            dataset: "d".into(),
            instruction: String::new(),
            default_verifier: "numeric".into(),
            tasks: 3,
            validation: 0,
            steps: 1,
            options: crate::learn::grpo::LearnOptions {
                model: "m".into(),
                ..Default::default()
            },
            gate_split: None,
        };
        std::fs::write(run.join("run.json"), serde_json::to_vec(&info).unwrap()).unwrap();
        std::fs::write(
            run.join("step-0001/groups.json"),
            r#"[{"task":0,"question":"q0","answer":"1","rewards":[1,0],"proposals":[{"op":"add","text":"Check units: convert first."}]},
                {"task":1,"question":"q1","answer":"2","rewards":[0,1],"proposals":[{"op":"add","text":"Other."}]},
                {"task":2,"question":"q2","answer":"3","rewards":[1,1],"proposals":[]}]"#,
        )
        .unwrap();
        std::fs::write(
            run.join("step-0001/rollouts.jsonl"),
            "{\"task\":0,\"attempt\":0,\"output\":\"1\",\"reward\":1.0}\n{\"task\":0,\"attempt\":1,\"output\":\"7\",\"reward\":0.0}\n",
        )
        .unwrap();
        let e = step_evidence(
            dir.path(),
            "r1",
            1,
            Some("Check units: convert first."),
            None,
        )
        .unwrap();
        let groups = e["groups"].as_array().unwrap();
        assert_eq!(groups.len(), 2, "groups that proposed nothing are left out");
        assert_eq!(groups[0]["produced"], json!(true));
        assert_eq!(groups[1]["produced"], json!(false));
        assert_eq!(groups[0]["attempts"].as_array().unwrap().len(), 2);
        assert_eq!(groups[0]["attempts"][1]["reward"], json!(0.0));
        assert_eq!(e["model"], json!("m"));
        assert!(step_evidence(dir.path(), "missing", 1, None, None).is_none());
    }
}
