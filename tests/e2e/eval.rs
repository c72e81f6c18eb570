//! `experient eval` on real BIG-Bench Hard questions with the real model, with and without a
//! library.

use std::process::Command;

use serde_json::Value;

#[test]
fn eval_reports_accuracy_with_and_without_a_library() {
    let root = env!("CARGO_MANIFEST_DIR");
    let tmp = tempfile::tempdir().unwrap();
    // The example library shipped in the repository, copied so the test writes nothing there.
    let lib = tmp.path().join("experience/example");
    std::fs::create_dir_all(&lib).unwrap();
    for f in ["log.jsonl", "library.json"] {
        std::fs::copy(format!("{root}/experience/example/{f}"), lib.join(f)).unwrap();
    }
    let out = tmp.path().join("report.json");
    let run = Command::new(env!("CARGO_BIN_EXE_experient"))
        .args(["eval", "--dataset"])
        .arg(format!("{root}/tests/data/boolean_expressions.json"))
        .args([
            "--limit",
            "4",
            "--max-tokens",
            "6",
            "--library",
            "example",
            "--seed",
            "1",
        ])
        .arg("--experience-dir")
        .arg(tmp.path().join("experience"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let printed: Value = serde_json::from_slice(&run.stdout).unwrap();
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(printed, saved);
    assert_eq!(printed["dataset"], "boolean_expressions");
    let arms = printed["arms"].as_array().unwrap();
    assert_eq!(arms.len(), 2);
    assert!(arms[0]["library"].is_null());
    assert_eq!(arms[1]["library"], "example");
    assert_eq!(
        arms[1]["experiences"], 5,
        "the example library's five experiences were injected"
    );
    for arm in arms {
        assert_eq!(arm["tasks"], 4);
        let acc = arm["accuracy"].as_f64().unwrap();
        let ci = arm["ci95"].as_array().unwrap();
        assert!((0.0..=1.0).contains(&acc));
        assert!(ci[0].as_f64().unwrap() <= acc && acc <= ci[1].as_f64().unwrap());
    }
}
