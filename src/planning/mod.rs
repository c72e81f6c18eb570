//! Code-driven planning (IPP): environments with known scoring, and the loop in which a model
//! writes a program as its policy, the program runs in the sandbox, and the worst failures
//! are fed back until it is good enough to reuse across instances.

pub(crate) mod cache;
pub(crate) mod grasp;
pub mod ipp;
pub mod minigrid;
pub mod nprand;

use serde::Serialize;
use serde_json::{json, Value};

use self::grasp::Grasp;
use self::minigrid::{Action, Level, MiniGrid};

/// A family of tasks that one program should solve: a MiniGrid level or a GRASP setting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Family {
    MiniGrid(Level),
    Grasp(grasp::Variant),
}

impl Family {
    /// The family a name means: a MiniGrid id or a GRASP variant.
    pub fn parse(name: &str) -> Option<Family> {
        if let Some(s) = grasp::Variant::parse(name) {
            return Some(Family::Grasp(s));
        }
        Level::parse(name).map(Family::MiniGrid)
    }

    /// The canonical name, also the key of the program cache.
    pub fn name(&self) -> String {
        match self {
            Family::MiniGrid(l) => l.id(),
            Family::Grasp(s) => s.name(),
        }
    }

    /// What `parse` accepts, for error messages and `--help`.
    pub fn known() -> String {
        let mut names: Vec<String> = Level::IDS.iter().map(|s| s.to_string()).collect();
        names.push("grasp[-diag][-carryN][-costX][-sizeN]".into());
        names.join(", ")
    }

    /// The instance generated from `seed`, the same one on every machine.
    pub fn instance(&self, seed: u64) -> Instance {
        match *self {
            Family::MiniGrid(level) => Instance::MiniGrid {
                seed,
                env: MiniGrid::new(level, seed),
            },
            Family::Grasp(s) => Instance::Grasp {
                id: format!("seed {seed}"),
                grid: Grasp::generate(s, seed),
            },
        }
    }

    /// The actions a list may name, spelled as `plan_rules.j2` spells them.
    pub fn actions(&self) -> Vec<&'static str> {
        match self {
            Family::MiniGrid(_) => Action::ALL.iter().map(|a| a.name()).collect(),
            Family::Grasp(s) => {
                let mut moves = vec!["UP", "DOWN", "LEFT", "RIGHT"];
                if s.diagonals {
                    moves.extend(["UP_LEFT", "UP_RIGHT", "DOWN_LEFT", "DOWN_RIGHT"]);
                }
                moves.extend(["TAKE", "DROP"]);
                moves
            }
        }
    }

    /// The most actions that count in one episode.
    pub fn max_actions(&self) -> usize {
        match self {
            Family::MiniGrid(level) => MiniGrid::new(*level, 0).max_steps as usize,
            Family::Grasp(s) => s.max_actions,
        }
    }

    /// Values for `plan_rules.j2`.
    pub fn rules_context(&self) -> Value {
        match self {
            Family::MiniGrid(level) => json!({
                "kind": "minigrid",
                "family": level.id(),
                "mission": level.mission(),
                "max_steps": MiniGrid::new(*level, 0).max_steps,
            }),
            Family::Grasp(s) => json!({
                "kind": "grasp",
                "family": s.name(),
                "diagonals": s.diagonals,
                "carry_limit": s.carry_limit,
                "cost_per_step": s.cost_per_step,
                "max_actions": s.max_actions,
            }),
        }
    }
}

/// One task of a family, ready to be played.
#[derive(Debug, Clone)]
pub enum Instance {
    MiniGrid { seed: u64, env: MiniGrid },
    Grasp { id: String, grid: Grasp },
}

/// How one action sequence did on one instance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Played {
    /// MiniGrid's episode reward, or GRASP's score.
    pub reward: f64,
    /// MiniGrid: the mission was accomplished; GRASP: energy came back and the score is positive.
    pub success: bool,
    /// Actions that counted (played before the episode ended).
    pub steps: usize,
    /// What went wrong, in words a model can act on.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

impl Instance {
    /// How reports name the instance (its seed, or its position for given grids).
    pub fn id(&self) -> String {
        match self {
            Instance::MiniGrid { seed, .. } => format!("seed {seed}"),
            Instance::Grasp { id, .. } => id.clone(),
        }
    }

    /// What a program's `solve(obs)` receives.
    pub fn observation(&self) -> Value {
        match self {
            Instance::MiniGrid { env, .. } => env.observation(),
            Instance::Grasp { grid, .. } => grid.observation(),
        }
    }

    /// A text drawing of the instance, for prompts.
    pub fn render(&self) -> String {
        match self {
            Instance::MiniGrid { env, .. } => env.render(),
            Instance::Grasp { grid, .. } => grid.render(),
        }
    }

    /// Plays `actions` from the start and scores the episode.
    pub fn play(&self, actions: &[String]) -> Played {
        match self {
            Instance::MiniGrid { env, .. } => {
                let mut env = env.clone();
                let mut unknown = Vec::new();
                let (mut reward, mut steps, mut end) = (0.0, 0, None);
                for a in actions {
                    let Some(action) = Action::parse(a) else {
                        unknown.push(a.clone());
                        continue;
                    };
                    let step = env.step(action);
                    steps += 1;
                    if step.terminated || step.truncated {
                        reward = step.reward;
                        end = Some(if step.reward > 0.0 {
                            "won"
                        } else if step.terminated {
                            "lost in the lava"
                        } else {
                            "ran out of actions"
                        });
                        break;
                    }
                }
                let mut note = match end {
                    Some("won") => String::new(),
                    Some(e) => format!("the agent {e}"),
                    _ => format!(
                        "the actions ran out before the mission was done; the agent ended at {:?} facing {}",
                        env.agent,
                        env.direction_name()
                    ),
                };
                if !unknown.is_empty() {
                    unknown.truncate(3);
                    note.push_str(&format!("; unknown actions were skipped: {unknown:?}"));
                }
                Played {
                    reward,
                    success: end == Some("won"),
                    steps,
                    note: note.trim_start_matches("; ").to_owned(),
                }
            }
            Instance::Grasp { grid, .. } => {
                let s = grid.score(actions);
                let mut note = Vec::new();
                if s.energy_at_start == 0 {
                    note.push("no energy was brought back to the start cell".to_string());
                }
                if s.invalid_moves > 0 {
                    note.push(format!(
                        "{} moves hit an obstacle or the edge",
                        s.invalid_moves
                    ));
                }
                if s.unknown_actions > 0 {
                    note.push(format!("{} unknown actions", s.unknown_actions));
                }
                if actions.len() > grid.settings.max_actions {
                    note.push(format!(
                        "{} actions given, only the first {} count",
                        actions.len(),
                        grid.settings.max_actions
                    ));
                }
                Played {
                    reward: s.score,
                    success: s.energy_at_start > 0 && s.score > 0.0,
                    steps: actions.len().min(grid.settings.max_actions),
                    note: note.join("; "),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompts::Prompts;

    #[test]
    fn every_family_renders_every_planning_prompt() {
        let prompts = Prompts::builtin();
        let mut names: Vec<&str> = Level::IDS.to_vec();
        names.extend(["grasp", "grasp-diag-carry2-cost0.3"]);
        for name in names {
            let family = Family::parse(name).unwrap();
            let inst = family.instance(3);
            let mut ctx = family.rules_context();
            ctx["task"] = json!("Be quick.");
            ctx["example"] = json!(inst.observation().to_string());
            ctx["render"] = json!(inst.render());
            ctx["obs"] = json!(inst.observation().to_string());
            ctx["code"] = json!("def solve(obs): return []");
            ctx["keys"] = json!("grid, agent");
            ctx["failures"] = json!([{"render": inst.render(), "obs": "{}", "result": "failed"}]);
            for t in [
                "plan_pseudocode.j2",
                "plan_code.j2",
                "plan_refine.j2",
                "plan_direct.j2",
            ] {
                let text = prompts.render(t, &ctx).unwrap();
                assert!(text.len() > 50, "{name} {t}");
            }
            let rules = prompts.render("plan_rules.j2", &ctx).unwrap();
            let unlock = rules.contains("won as soon as the door is opened");
            assert_eq!(unlock, name == "MiniGrid-Unlock-v0", "{name}");
            assert_eq!(rules.contains("UP_LEFT"), name.contains("diag"), "{name}");
        }
    }
}
