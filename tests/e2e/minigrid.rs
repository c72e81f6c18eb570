//! Our MiniGrid levels against the `minigrid` Python package (3.0): the same seed must give
//! the same layout, and the same actions the same states, rewards and episode ends.
//!
//! Runs the package with `EXPERIENT_PYTHON` (default `python3`); when that Python lacks
//! `minigrid`, the test installs `minigrid==3.0.0` with pip into a folder under target/ first.

use std::io::Write;
use std::process::{Command, Stdio};

use experient::planning::minigrid::{Action, Level, MiniGrid};
use experient::planning::nprand::NpRandom;
use serde_json::{json, Value};

const MINIGRID: &str = "minigrid==3.0.0";

/// A command that runs Python with `minigrid` importable.
fn python() -> Command {
    let exe = std::env::var("EXPERIENT_PYTHON").unwrap_or_else(|_| "python3".into());
    let has = |path: Option<&str>| {
        let mut c = Command::new(&exe);
        if let Some(p) = path {
            c.env("PYTHONPATH", p);
        }
        c.args(["-c", "import minigrid"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has(None) {
        return Command::new(exe);
    }
    let dir = concat!(env!("CARGO_TARGET_TMPDIR"), "/minigrid-3.0.0");
    if !has(Some(dir)) {
        let status = Command::new(&exe)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(["--target", dir, MINIGRID])
            .status()
            .expect("run pip");
        assert!(status.success(), "pip install {MINIGRID} failed");
    }
    let mut c = Command::new(exe);
    c.env("PYTHONPATH", dir);
    c
}

fn reference(cases: &Value) -> Vec<Value> {
    let mut child = python()
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/minigrid_reference.py"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cases.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the reference script failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn state(env: &MiniGrid) -> Value {
    json!({
        "grid": env.encode(),
        "agent": [env.agent.0, env.agent.1],
        "dir": env.dir,
        "carrying": env.carrying.map(|o| o.encode()),
    })
}

#[test]
fn layouts_and_dynamics_match_the_python_package() {
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for id in Level::IDS {
        let level = Level::parse(id).unwrap();
        let seeds: Vec<u64> = if id.contains("16x16") {
            vec![0, 1, 7]
        } else {
            (0..12).chain([1000, 123_456]).collect()
        };
        for seed in seeds {
            let env = MiniGrid::new(level, seed);
            // A winning sequence reaches the reward; random ones exercise every action
            // (walls, pickups, drops, doors without the key, lava) and the step limit.
            let mut sequences = vec![env.shortest_solution().expect("solvable")];
            let mut rng = NpRandom::new(seed + 99);
            let len = if seed == 0 {
                env.max_steps as usize + 5
            } else {
                60
            };
            sequences.push(
                (0..len)
                    .map(|_| Action::ALL[rng.integers(0, 7) as usize])
                    .collect(),
            );
            for actions in sequences {
                let mut run = env.clone();
                let mut steps = Vec::new();
                for &a in &actions {
                    let s = run.step(a);
                    let mut v = state(&run);
                    v["reward"] = json!(s.reward);
                    v["terminated"] = json!(s.terminated);
                    v["truncated"] = json!(s.truncated);
                    steps.push(v);
                    if s.terminated || s.truncated {
                        break;
                    }
                }
                ours.push((id, seed, json!({"initial": state(&env), "steps": steps})));
                let codes: Vec<u8> = actions.iter().map(|&a| a as u8).collect();
                cases.push(json!({"id": id, "seed": seed, "actions": codes}));
            }
        }
    }
    let theirs = reference(&Value::Array(cases));
    assert_eq!(theirs.len(), ours.len());
    let mut rewarded = 0;
    for ((id, seed, mine), reference) in ours.iter().zip(&theirs) {
        assert_eq!(
            mine["initial"], reference["initial"],
            "{id} seed {seed}: the initial state differs"
        );
        let (a, b) = (
            mine["steps"].as_array().unwrap(),
            reference["steps"].as_array().unwrap(),
        );
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            for key in [
                "agent",
                "dir",
                "carrying",
                "grid",
                "terminated",
                "truncated",
            ] {
                assert_eq!(x[key], y[key], "{id} seed {seed} step {i}: {key} differs");
            }
            let (rx, ry) = (x["reward"].as_f64().unwrap(), y["reward"].as_f64().unwrap());
            assert!(
                (rx - ry).abs() < 1e-9,
                "{id} seed {seed} step {i}: reward {rx} vs {ry}"
            );
            rewarded += (rx > 0.0) as usize;
        }
        assert_eq!(
            a.len(),
            b.len(),
            "{id} seed {seed}: the episodes end at different steps"
        );
    }
    assert!(
        rewarded >= Level::IDS.len(),
        "the winning sequences were rewarded"
    );
}
