//! GRASP's energy-collection task (arXiv 2407.01892), scored as the IPP paper's harness
//! scores it: the agent 'A' gathers energy 'E' and must bring it back to its start cell;
//! only the first 20 actions count, a blocked move leaves the agent where it is, and the score
//! is the energy on the start cell minus the step cost times the number of actions.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::nprand::NpRandom;

/// The rules that vary between GRASP settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    pub size: usize,
    pub diagonals: bool,
    pub carry_limit: u32,
    pub cost_per_step: f64,
    pub max_actions: usize,
}

impl Default for Variant {
    fn default() -> Self {
        Variant {
            size: 8,
            diagonals: false,
            carry_limit: 100,
            cost_per_step: 0.0,
            max_actions: 20,
        }
    }
}

impl Variant {
    /// `grasp`, optionally followed by `-diag`, `-carryN`, `-costX` and `-sizeN` in any order.
    pub fn parse(name: &str) -> Option<Variant> {
        let lower = name.trim().to_ascii_lowercase();
        let mut parts = lower.split('-');
        if parts.next()? != "grasp" {
            return None;
        }
        let mut s = Variant::default();
        for p in parts {
            if p == "diag" {
                s.diagonals = true;
            } else if let Some(n) = p.strip_prefix("carry") {
                s.carry_limit = n.parse().ok().filter(|&n| n > 0)?;
            } else if let Some(c) = p.strip_prefix("cost") {
                s.cost_per_step = c.parse().ok().filter(|c: &f64| (0.0..=10.0).contains(c))?;
            } else if let Some(n) = p.strip_prefix("size") {
                s.size = n.parse().ok().filter(|n| (4..=20).contains(n))?;
            } else {
                return None;
            }
        }
        Some(s)
    }

    /// The family's name as requests spell it: `grasp`, with `-diag` and other variant flags.
    pub fn name(&self) -> String {
        let mut name = "grasp".to_string();
        if self.diagonals {
            name.push_str("-diag");
        }
        if self.carry_limit != 100 {
            name.push_str(&format!("-carry{}", self.carry_limit));
        }
        if self.cost_per_step != 0.0 {
            name.push_str(&format!("-cost{}", self.cost_per_step));
        }
        if self.size != 8 {
            name.push_str(&format!("-size{}", self.size));
        }
        name
    }
}

/// One grid: rows of '.', 'A', 'E' and 'O'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grasp {
    pub settings: Variant,
    pub rows: Vec<String>,
}

/// How a sequence of actions scored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    pub score: f64,
    pub energy_at_start: u32,
    pub returned_to_start: bool,
    pub invalid_moves: usize,
    pub unknown_actions: usize,
}

const MOVES: [(&str, (i64, i64)); 8] = [
    ("UP", (0, -1)),
    ("DOWN", (0, 1)),
    ("LEFT", (-1, 0)),
    ("RIGHT", (1, 0)),
    ("UP_LEFT", (-1, -1)),
    ("UP_RIGHT", (1, -1)),
    ("DOWN_LEFT", (-1, 1)),
    ("DOWN_RIGHT", (1, 1)),
];

impl Grasp {
    /// A random grid: about a fifth energy, a tenth obstacles, the agent anywhere free.
    pub fn generate(settings: Variant, seed: u64) -> Grasp {
        let mut rng = NpRandom::new(seed);
        let n = settings.size;
        let mut cells = vec![b'.'; n * n];
        for c in cells.iter_mut() {
            *c = match rng.integers(0, 10) {
                0 | 1 => b'E',
                2 => b'O',
                _ => b'.',
            };
        }
        let start = rng.integers(0, (n * n) as i64) as usize;
        cells[start] = b'A';
        let rows = cells
            .chunks(n)
            .map(|r| String::from_utf8(r.to_vec()).expect("ascii"))
            .collect();
        Grasp { settings, rows }
    }

    /// Validates a grid given by a client.
    pub fn from_rows(settings: Variant, rows: Vec<String>) -> Result<Grasp, String> {
        let width = rows.first().map_or(0, |r| r.len());
        if rows.is_empty() || width == 0 {
            return Err("the grid is empty".into());
        }
        if rows.iter().any(|r| r.len() != width) {
            return Err("the grid's rows differ in length".into());
        }
        if let Some(c) = rows.concat().chars().find(|c| !".AEO".contains(*c)) {
            return Err(format!(
                "unknown cell {c:?}: cells are '.', 'A', 'E' and 'O'"
            ));
        }
        if rows.concat().matches('A').count() != 1 {
            return Err("the grid needs exactly one 'A'".into());
        }
        Ok(Grasp { settings, rows })
    }

    /// Where the agent (`A`) starts.
    pub fn start(&self) -> (i64, i64) {
        for (y, row) in self.rows.iter().enumerate() {
            if let Some(x) = row.find('A') {
                return (x as i64, y as i64);
            }
        }
        unreachable!("validated: one 'A'")
    }

    /// How many energy cells (`E`) the grid holds.
    pub fn energy(&self) -> usize {
        self.rows.iter().map(|r| r.matches('E').count()).sum()
    }

    /// What a program receives.
    pub fn observation(&self) -> Value {
        let (x, y) = self.start();
        json!({
            "grid": self.rows,
            "start": [x, y],
            "carry_limit": self.settings.carry_limit,
            "cost_per_step": self.settings.cost_per_step,
            "diagonals": self.settings.diagonals,
            "max_actions": self.settings.max_actions,
        })
    }

    /// The grid as text, one row a line, as the model sees it.
    pub fn render(&self) -> String {
        self.rows.join("\n") + "\n"
    }

    /// Plays the first `max_actions` actions and scores them.
    pub fn score(&self, actions: &[String]) -> Score {
        let s = self.settings;
        let height = self.rows.len() as i64;
        let width = self.rows[0].len() as i64;
        let mut energy: Vec<u32> = self
            .rows
            .concat()
            .bytes()
            .map(|c| (c == b'E') as u32)
            .collect();
        let blocked: Vec<bool> = self.rows.concat().bytes().map(|c| c == b'O').collect();
        let at = |x: i64, y: i64| (y * width + x) as usize;
        let start = self.start();
        let (mut x, mut y) = start;
        let mut carried = 0u32;
        let (mut invalid, mut unknown) = (0, 0);
        let counted = &actions[..actions.len().min(s.max_actions)];
        for a in counted {
            let a = a.trim().to_ascii_uppercase().replace([' ', '-'], "_");
            match a.as_str() {
                "TAKE" => {
                    if carried < s.carry_limit && energy[at(x, y)] > 0 {
                        energy[at(x, y)] -= 1;
                        carried += 1;
                    }
                }
                "DROP" => {
                    energy[at(x, y)] += carried;
                    carried = 0;
                }
                name => match MOVES.iter().position(|(m, _)| *m == name) {
                    Some(i) => {
                        let (dx, dy) = MOVES[i].1;
                        let (nx, ny) = (x + dx, y + dy);
                        let diagonal = i >= 4;
                        if (diagonal && !s.diagonals)
                            || nx < 0
                            || ny < 0
                            || nx >= width
                            || ny >= height
                            || blocked[at(nx, ny)]
                        {
                            invalid += 1;
                        } else {
                            (x, y) = (nx, ny);
                        }
                    }
                    None => unknown += 1,
                },
            }
        }
        let energy_at_start = energy[at(start.0, start.1)];
        Score {
            score: energy_at_start as f64 - s.cost_per_step * counted.len() as f64,
            energy_at_start,
            returned_to_start: (x, y) == start,
            invalid_moves: invalid,
            unknown_actions: unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acts(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn scoring_follows_the_reference_harness() {
        let settings = Variant {
            carry_limit: 1,
            cost_per_step: 0.25,
            ..Variant::default()
        };
        let g = Grasp::from_rows(settings, vec!["AEE".into(), ".O.".into()]).unwrap();
        // Take one, come back, drop: 1 energy, 4 actions.
        let s = g.score(&acts("RIGHT TAKE LEFT DROP"));
        assert_eq!((s.energy_at_start, s.score), (1, 0.0));
        // The carry limit stops the second TAKE; the obstacle and the diagonal are invalid.
        let s = g.score(&acts("RIGHT TAKE RIGHT TAKE DOWN_LEFT LEFT LEFT DROP"));
        assert_eq!(s.energy_at_start, 1);
        assert_eq!(s.invalid_moves, 1, "the diagonal is not allowed");
        let s = g.score(&acts("DOWN RIGHT"));
        assert_eq!((s.invalid_moves, s.returned_to_start), (1, false));
        // Only the first 20 actions count, for the energy and for the cost.
        let mut long = acts("RIGHT TAKE LEFT");
        long.extend(std::iter::repeat_n("UP".to_string(), 20));
        long.push("DROP".into());
        let s = g.score(&long);
        assert_eq!(s.energy_at_start, 0);
        assert_eq!(s.score, -5.0);
    }

    #[test]
    fn names_and_generation() {
        let s = Variant::parse("grasp-diag-carry2-cost0.3").unwrap();
        assert!(s.diagonals && s.carry_limit == 2 && s.cost_per_step == 0.3);
        assert_eq!(s.name(), "grasp-diag-carry2-cost0.3");
        assert!(Variant::parse("grasp-fly").is_none());
        let a = Grasp::generate(s, 5);
        assert_eq!(a, Grasp::generate(s, 5), "seeded");
        assert_ne!(a, Grasp::generate(s, 6));
        assert!(Grasp::from_rows(s, a.rows.clone()).is_ok());
        assert!(a.energy() > 0);
    }
}
