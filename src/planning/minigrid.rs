//! MiniGrid's Empty, DoorKey, Unlock, FourRooms and LavaCrossing levels, with the Python
//! package's dynamics and, for the same seed, the same layout (`tests/e2e/minigrid.rs` checks both
//! against `minigrid` 3.0 itself).
//!
//! The world is fully observed here: a planning program receives the whole grid, the agent's
//! position and direction, and returns the actions to take, as in the IPP paper's MiniGrid runs.

use serde::Serialize;
use serde_json::{json, Value};

use super::nprand::NpRandom;

/// The object colours of MiniGrid, in its index order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Red,
    Green,
    Blue,
    Purple,
    Yellow,
    Grey,
}

impl Color {
    /// MiniGrid's `COLOR_NAMES`: sorted by name, the order `_rand_color` draws from.
    const SORTED: [Color; 6] = [
        Color::Blue,
        Color::Green,
        Color::Grey,
        Color::Purple,
        Color::Red,
        Color::Yellow,
    ];

    fn index(self) -> u8 {
        self as u8
    }

    /// The colour as MiniGrid names it.
    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Purple => "purple",
            Color::Yellow => "yellow",
            Color::Grey => "grey",
        }
    }
}

/// What a cell can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Obj {
    Wall,
    Goal,
    Lava,
    Key(Color),
    Ball(Color),
    Box(Color),
    Door {
        color: Color,
        open: bool,
        locked: bool,
    },
}

impl Obj {
    /// MiniGrid's `(OBJECT_IDX, COLOR_IDX, STATE)` encoding.
    pub fn encode(self) -> [u8; 3] {
        match self {
            Obj::Wall => [2, Color::Grey.index(), 0],
            Obj::Goal => [8, Color::Green.index(), 0],
            Obj::Lava => [9, Color::Red.index(), 0],
            Obj::Key(c) => [5, c.index(), 0],
            Obj::Ball(c) => [6, c.index(), 0],
            Obj::Box(c) => [7, c.index(), 0],
            Obj::Door {
                color,
                open,
                locked,
            } => [
                4,
                color.index(),
                if open {
                    0
                } else if locked {
                    2
                } else {
                    1
                },
            ],
        }
    }

    fn can_overlap(self) -> bool {
        matches!(self, Obj::Goal | Obj::Lava | Obj::Door { open: true, .. })
    }

    fn can_pickup(self) -> bool {
        matches!(self, Obj::Key(_) | Obj::Ball(_) | Obj::Box(_))
    }

    /// The name a program sees for this cell.
    pub fn name(self) -> &'static str {
        match self {
            Obj::Wall => "WALL",
            Obj::Goal => "GOAL",
            Obj::Lava => "LAVA",
            Obj::Key(_) => "KEY",
            Obj::Ball(_) => "BALL",
            Obj::Box(_) => "BOX",
            Obj::Door { open: true, .. } => "OPEN_DOOR",
            Obj::Door { locked: true, .. } => "LOCKED_DOOR",
            Obj::Door { .. } => "CLOSED_DOOR",
        }
    }

    fn glyph(self) -> char {
        match self {
            Obj::Wall => '#',
            Obj::Goal => 'G',
            Obj::Lava => '~',
            Obj::Key(_) => 'K',
            Obj::Ball(_) => 'o',
            Obj::Box(_) => 'B',
            Obj::Door { open: true, .. } => '/',
            Obj::Door { locked: true, .. } => 'D',
            Obj::Door { .. } => 'd',
        }
    }
}

/// MiniGrid's actions, numbered as in `minigrid.core.actions.Actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Left = 0,
    Right = 1,
    Forward = 2,
    Pickup = 3,
    Drop = 4,
    Toggle = 5,
    Done = 6,
}

impl Action {
    /// Every action, in MiniGrid's index order.
    pub const ALL: [Action; 7] = [
        Action::Left,
        Action::Right,
        Action::Forward,
        Action::Pickup,
        Action::Drop,
        Action::Toggle,
        Action::Done,
    ];

    /// The action as programs write it.
    pub fn name(self) -> &'static str {
        match self {
            Action::Left => "left",
            Action::Right => "right",
            Action::Forward => "forward",
            Action::Pickup => "pickup",
            Action::Drop => "drop",
            Action::Toggle => "toggle",
            Action::Done => "done",
        }
    }

    /// Accepts the names programs tend to write (`"FORWARD"`, `"move"`, `"turn_left"`, `2`).
    pub fn parse(s: &str) -> Option<Action> {
        let s = s.trim().to_ascii_lowercase().replace([' ', '-'], "_");
        Some(match s.as_str() {
            "left" | "turn_left" | "l" | "0" => Action::Left,
            "right" | "turn_right" | "r" | "1" => Action::Right,
            "forward" | "move" | "move_forward" | "f" | "2" => Action::Forward,
            "pickup" | "pick_up" | "3" => Action::Pickup,
            "drop" | "4" => Action::Drop,
            "toggle" | "unlock" | "open" | "5" => Action::Toggle,
            "done" | "6" => Action::Done,
            _ => return None,
        })
    }
}

/// Which level, with its parameters; names follow the Python package's ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Empty { size: i64, random_start: bool },
    DoorKey { size: i64 },
    Unlock,
    FourRooms,
    LavaCrossing { size: i64, crossings: usize },
}

impl Level {
    /// The levels registered by `minigrid` 3.0 that we implement, by their gymnasium ids.
    pub const IDS: [&'static str; 15] = [
        "MiniGrid-Empty-5x5-v0",
        "MiniGrid-Empty-Random-5x5-v0",
        "MiniGrid-Empty-6x6-v0",
        "MiniGrid-Empty-Random-6x6-v0",
        "MiniGrid-Empty-8x8-v0",
        "MiniGrid-Empty-16x16-v0",
        "MiniGrid-DoorKey-5x5-v0",
        "MiniGrid-DoorKey-6x6-v0",
        "MiniGrid-DoorKey-8x8-v0",
        "MiniGrid-DoorKey-16x16-v0",
        "MiniGrid-Unlock-v0",
        "MiniGrid-FourRooms-v0",
        "MiniGrid-LavaCrossingS9N1-v0",
        "MiniGrid-LavaCrossingS9N2-v0",
        "MiniGrid-LavaCrossingS9N3-v0",
    ];

    /// Parses a gymnasium id, case-insensitively and with or without `MiniGrid-` and `-v0`.
    pub fn parse(id: &str) -> Option<Level> {
        let lower = id.trim().to_ascii_lowercase();
        let s = lower.strip_prefix("minigrid-").unwrap_or(&lower);
        let s = s.strip_suffix("-v0").unwrap_or(s);
        let size = |t: &str| -> Option<i64> {
            let (a, b) = t.split_once('x')?;
            let n: i64 = a.parse().ok()?;
            (b.parse::<i64>().ok()? == n && (4..=32).contains(&n)).then_some(n)
        };
        if let Some(rest) = s.strip_prefix("empty-random-") {
            return Some(Level::Empty {
                size: size(rest)?,
                random_start: true,
            });
        }
        if let Some(rest) = s.strip_prefix("empty-") {
            return Some(Level::Empty {
                size: size(rest)?,
                random_start: false,
            });
        }
        if let Some(rest) = s.strip_prefix("doorkey-") {
            let size = size(rest)?;
            return (size >= 5).then_some(Level::DoorKey { size });
        }
        match s {
            "unlock" => return Some(Level::Unlock),
            "fourrooms" => return Some(Level::FourRooms),
            _ => {}
        }
        let rest = s.strip_prefix("lavacrossings")?;
        let (size, n) = rest.split_once('n')?;
        let (size, crossings): (i64, usize) = (size.parse().ok()?, n.parse().ok()?);
        let valid = size % 2 == 1 && (5..=31).contains(&size) && crossings >= 1;
        valid.then_some(Level::LavaCrossing { size, crossings })
    }

    /// The canonical gymnasium id.
    pub fn id(self) -> String {
        match self {
            Level::Empty {
                size,
                random_start: false,
            } => format!("MiniGrid-Empty-{size}x{size}-v0"),
            Level::Empty {
                size,
                random_start: true,
            } => format!("MiniGrid-Empty-Random-{size}x{size}-v0"),
            Level::DoorKey { size } => format!("MiniGrid-DoorKey-{size}x{size}-v0"),
            Level::Unlock => "MiniGrid-Unlock-v0".into(),
            Level::FourRooms => "MiniGrid-FourRooms-v0".into(),
            Level::LavaCrossing { size, crossings } => {
                format!("MiniGrid-LavaCrossingS{size}N{crossings}-v0")
            }
        }
    }

    /// The mission string MiniGrid gives the level.
    pub fn mission(self) -> &'static str {
        match self {
            Level::Empty { .. } => "get to the green goal square",
            Level::DoorKey { .. } => "use the key to open the door and then get to the goal",
            Level::Unlock => "open the door",
            Level::FourRooms => "reach the goal",
            Level::LavaCrossing { .. } => "avoid the lava and get to the green goal square",
        }
    }

    fn dims(self) -> (i64, i64) {
        match self {
            Level::Empty { size, .. }
            | Level::DoorKey { size }
            | Level::LavaCrossing { size, .. } => (size, size),
            // RoomGrid with one row of two 6-cell rooms sharing a wall.
            Level::Unlock => (11, 6),
            Level::FourRooms => (19, 19),
        }
    }

    fn max_steps(self) -> u32 {
        match self {
            Level::Empty { size, .. } | Level::LavaCrossing { size, .. } => {
                4 * (size * size) as u32
            }
            Level::DoorKey { size } => 10 * (size * size) as u32,
            Level::Unlock => 8 * 36,
            Level::FourRooms => 100,
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Step {
    pub reward: f64,
    pub terminated: bool,
    pub truncated: bool,
}

const DIRS: [(i64, i64); 4] = [(1, 0), (0, 1), (-1, 0), (0, -1)];

/// One episode of a level.
#[derive(Debug, Clone)]
pub struct MiniGrid {
    pub level: Level,
    pub width: i64,
    pub height: i64,
    cells: Vec<Option<Obj>>,
    pub agent: (i64, i64),
    /// 0 right, 1 down, 2 left, 3 up (MiniGrid's `agent_dir`).
    pub dir: u8,
    pub carrying: Option<Obj>,
    pub step_count: u32,
    pub max_steps: u32,
    /// Unlock's door, whose opening ends the episode.
    door: Option<(i64, i64)>,
    rng: NpRandom,
}

impl MiniGrid {
    /// `gym.make(level).reset(seed=seed)`.
    pub fn new(level: Level, seed: u64) -> MiniGrid {
        let (width, height) = level.dims();
        let mut env = MiniGrid {
            level,
            width,
            height,
            cells: vec![None; (width * height) as usize],
            agent: (-1, -1),
            dir: 0,
            carrying: None,
            step_count: 0,
            max_steps: level.max_steps(),
            door: None,
            rng: NpRandom::new(seed),
        };
        env.generate();
        env
    }

    /// The object at `(x, y)`; panics outside the grid, which no caller may ask for.
    pub fn get(&self, x: i64, y: i64) -> Option<Obj> {
        assert!(x >= 0 && x < self.width && y >= 0 && y < self.height);
        self.cells[(y * self.width + x) as usize]
    }

    fn set(&mut self, x: i64, y: i64, obj: Option<Obj>) {
        assert!(x >= 0 && x < self.width && y >= 0 && y < self.height);
        self.cells[(y * self.width + x) as usize] = obj;
    }

    fn horz_wall(&mut self, x: i64, y: i64, length: Option<i64>) {
        for i in 0..length.unwrap_or(self.width - x) {
            self.set(x + i, y, Some(Obj::Wall));
        }
    }

    fn vert_wall(&mut self, x: i64, y: i64, length: Option<i64>) {
        for j in 0..length.unwrap_or(self.height - y) {
            self.set(x, y + j, Some(Obj::Wall));
        }
    }

    fn wall_rect(&mut self, x: i64, y: i64, w: i64, h: i64) {
        self.horz_wall(x, y, Some(w));
        self.horz_wall(x, y + h - 1, Some(w));
        self.vert_wall(x, y, Some(h));
        self.vert_wall(x + w - 1, y, Some(h));
    }

    fn rand_int(&mut self, low: i64, high: i64) -> i64 {
        self.rng.integers(low, high)
    }

    /// `place_obj`: rejection sampling in a rectangle, avoiding objects and the agent.
    fn place_obj(
        &mut self,
        obj: Option<Obj>,
        top: (i64, i64),
        size: Option<(i64, i64)>,
        reject_near_agent: bool,
    ) -> (i64, i64) {
        let top = (top.0.max(0), top.1.max(0));
        let size = size.unwrap_or((self.width, self.height));
        loop {
            let x = self.rand_int(top.0, (top.0 + size.0).min(self.width));
            let y = self.rand_int(top.1, (top.1 + size.1).min(self.height));
            if self.get(x, y).is_some() || (x, y) == self.agent {
                continue;
            }
            if reject_near_agent && (self.agent.0 - x).abs() + (self.agent.1 - y).abs() < 2 {
                continue;
            }
            self.set(x, y, obj);
            return (x, y);
        }
    }

    fn place_agent(&mut self, top: (i64, i64), size: Option<(i64, i64)>) {
        self.agent = (-1, -1);
        self.agent = self.place_obj(None, top, size, false);
        self.dir = self.rand_int(0, 4) as u8;
    }

    /// The cell the agent faces.
    pub fn front(&self) -> (i64, i64) {
        let (dx, dy) = DIRS[self.dir as usize];
        (self.agent.0 + dx, self.agent.1 + dy)
    }

    fn generate(&mut self) {
        match self.level {
            Level::Empty { random_start, .. } => self.empty(random_start),
            Level::DoorKey { .. } => self.door_key(),
            Level::Unlock => self.unlock(),
            Level::FourRooms => self.four_rooms(),
            Level::LavaCrossing { crossings, .. } => self.lava_crossing(crossings),
        }
    }

    /// MiniGrid-Empty: the goal in the far corner, the agent in the near one or anywhere.
    fn empty(&mut self, random_start: bool) {
        let (w, h) = (self.width, self.height);
        self.wall_rect(0, 0, w, h);
        self.set(w - 2, h - 2, Some(Obj::Goal));
        if random_start {
            self.place_agent((0, 0), None);
        } else {
            self.agent = (1, 1);
            self.dir = 0;
        }
    }

    /// MiniGrid-DoorKey: a wall with a locked door splits the room; the key lies on the agent's side.
    fn door_key(&mut self) {
        let (w, h) = (self.width, self.height);
        self.wall_rect(0, 0, w, h);
        self.set(w - 2, h - 2, Some(Obj::Goal));
        let split = self.rand_int(2, w - 2);
        self.vert_wall(split, 0, None);
        self.place_agent((0, 0), Some((split, h)));
        let door_y = self.rand_int(1, h - 2);
        self.set(
            split,
            door_y,
            Some(Obj::Door {
                color: Color::Yellow,
                open: false,
                locked: true,
            }),
        );
        self.place_obj(
            Some(Obj::Key(Color::Yellow)),
            (0, 0),
            Some((split, h)),
            false,
        );
    }

    /// MiniGrid-Unlock: two rooms and a locked door between them, its key in the agent's room.
    fn unlock(&mut self) {
        // RoomGrid(num_rows=1, num_cols=2, room_size=6)._gen_grid.
        self.wall_rect(0, 0, 6, 6);
        self.wall_rect(5, 0, 6, 6);
        let door_y = self.rand_int(1, 5);
        self.agent = (8, 3);
        self.dir = 0;
        // add_door(0, 0, 0, locked=True) with a random color.
        let color = Color::SORTED[self.rand_int(0, 6) as usize];
        self.set(
            5,
            door_y,
            Some(Obj::Door {
                color,
                open: false,
                locked: true,
            }),
        );
        self.door = Some((5, door_y));
        // add_object(0, 0, "key", color): rejects cells next to the agent's old spot.
        self.place_obj(Some(Obj::Key(color)), (0, 0), Some((6, 6)), true);
        // RoomGrid.place_agent(0, 0): retry until the agent faces nothing or a wall.
        loop {
            self.place_agent((0, 0), Some((6, 6)));
            let (fx, fy) = self.front();
            if matches!(self.get(fx, fy), None | Some(Obj::Wall)) {
                break;
            }
        }
    }

    /// MiniGrid-FourRooms: four rooms joined by a gap in each inner wall, agent and goal anywhere.
    fn four_rooms(&mut self) {
        let (w, h) = (self.width, self.height);
        self.horz_wall(0, 0, None);
        self.horz_wall(0, h - 1, None);
        self.vert_wall(0, 0, None);
        self.vert_wall(w - 1, 0, None);
        let (room_w, room_h) = (w / 2, h / 2);
        for j in 0..2 {
            for i in 0..2 {
                let (xl, yt) = (i * room_w, j * room_h);
                let (xr, yb) = (xl + room_w, yt + room_h);
                if i + 1 < 2 {
                    self.vert_wall(xr, yt, Some(room_h));
                    let y = self.rand_int(yt + 1, yb);
                    self.set(xr, y, None);
                }
                if j + 1 < 2 {
                    self.horz_wall(xl, yb, Some(room_w));
                    let x = self.rand_int(xl + 1, xr);
                    self.set(x, yb, None);
                }
            }
        }
        self.place_agent((0, 0), None);
        self.place_obj(Some(Obj::Goal), (0, 0), None, false);
    }

    /// MiniGrid-LavaCrossing: rivers of lava with one opening each on a path to the goal.
    fn lava_crossing(&mut self, crossings: usize) {
        let (w, h) = (self.width, self.height);
        self.wall_rect(0, 0, w, h);
        self.agent = (1, 1);
        self.dir = 0;
        self.set(w - 2, h - 2, Some(Obj::Goal));
        // (vertical?, position) as in the Python list of rivers.
        let mut rivers: Vec<(bool, i64)> = (2..h - 2).step_by(2).map(|i| (true, i)).collect();
        rivers.extend((2..w - 2).step_by(2).map(|j| (false, j)));
        self.rng.shuffle(&mut rivers);
        rivers.truncate(crossings);
        let mut rivers_v: Vec<i64> = rivers.iter().filter(|r| r.0).map(|r| r.1).collect();
        let mut rivers_h: Vec<i64> = rivers.iter().filter(|r| !r.0).map(|r| r.1).collect();
        rivers_v.sort();
        rivers_h.sort();
        for i in 1..w - 1 {
            for &j in &rivers_h {
                self.set(i, j, Some(Obj::Lava));
            }
        }
        for &i in &rivers_v {
            for j in 1..h - 1 {
                self.set(i, j, Some(Obj::Lava));
            }
        }
        // The path to the goal: one opening per river, in a random order.
        let mut path: Vec<bool> = std::iter::repeat_n(false, rivers_v.len())
            .chain(std::iter::repeat_n(true, rivers_h.len()))
            .collect();
        self.rng.shuffle(&mut path);
        let limits_v: Vec<i64> = [0].into_iter().chain(rivers_v).chain([h - 1]).collect();
        let limits_h: Vec<i64> = [0].into_iter().chain(rivers_h).chain([w - 1]).collect();
        let (mut room_i, mut room_j) = (0, 0);
        for vertical in path {
            let (i, j) = if !vertical {
                let i = limits_v[room_i + 1];
                let j = self
                    .rng
                    .choice_range(limits_h[room_j] + 1, limits_h[room_j + 1]);
                room_i += 1;
                (i, j)
            } else {
                let i = self
                    .rng
                    .choice_range(limits_v[room_i] + 1, limits_v[room_i + 1]);
                let j = limits_h[room_j + 1];
                room_j += 1;
                (i, j)
            };
            self.set(i, j, None);
        }
    }
    /// `env.step(action)`.
    pub fn step(&mut self, action: Action) -> Step {
        self.step_count += 1;
        let mut reward = 0.0;
        let mut terminated = false;
        let (fx, fy) = self.front();
        let fwd = self.get(fx, fy);
        match action {
            Action::Left => self.dir = (self.dir + 3) % 4,
            Action::Right => self.dir = (self.dir + 1) % 4,
            Action::Forward => {
                if fwd.is_none_or(|o| o.can_overlap()) {
                    self.agent = (fx, fy);
                }
                match fwd {
                    Some(Obj::Goal) => {
                        terminated = true;
                        reward = self.reward();
                    }
                    Some(Obj::Lava) => terminated = true,
                    _ => {}
                }
            }
            Action::Pickup => {
                if let Some(o) = fwd {
                    if o.can_pickup() && self.carrying.is_none() {
                        self.carrying = Some(o);
                        self.set(fx, fy, None);
                    }
                }
            }
            Action::Drop => {
                if fwd.is_none() && self.carrying.is_some() {
                    let carried = self.carrying.take();
                    self.set(fx, fy, carried);
                }
            }
            Action::Toggle => match fwd {
                Some(Obj::Door {
                    color,
                    open,
                    locked,
                }) => {
                    let next = if locked {
                        if self.carrying == Some(Obj::Key(color)) {
                            Some((true, false))
                        } else {
                            None
                        }
                    } else {
                        Some((!open, false))
                    };
                    if let Some((open, locked)) = next {
                        self.set(
                            fx,
                            fy,
                            Some(Obj::Door {
                                color,
                                open,
                                locked,
                            }),
                        );
                    }
                }
                // A box turns into its contents, and ours are empty.
                Some(Obj::Box(_)) => self.set(fx, fy, None),
                _ => {}
            },
            Action::Done => {}
        }
        if action == Action::Toggle {
            if let Some((dx, dy)) = self.door {
                if matches!(self.get(dx, dy), Some(Obj::Door { open: true, .. })) {
                    reward = self.reward();
                    terminated = true;
                }
            }
        }
        Step {
            reward,
            terminated,
            truncated: self.step_count >= self.max_steps,
        }
    }

    fn reward(&self) -> f64 {
        1.0 - 0.9 * (self.step_count as f64 / self.max_steps as f64)
    }

    /// `env.grid.encode()`: `[x][y]` triples.
    pub fn encode(&self) -> Vec<Vec<[u8; 3]>> {
        (0..self.width)
            .map(|x| {
                (0..self.height)
                    .map(|y| self.get(x, y).map_or([1, 0, 0], Obj::encode))
                    .collect()
            })
            .collect()
    }

    /// The way the agent faces, as a word.
    pub fn direction_name(&self) -> &'static str {
        ["right", "down", "left", "up"][self.dir as usize]
    }

    /// What a program receives: the grid as rows (`grid[y][x]`), names of cells, and the agent.
    pub fn observation(&self) -> Value {
        let grid: Vec<Vec<&str>> = (0..self.height)
            .map(|y| {
                (0..self.width)
                    .map(|x| self.get(x, y).map_or("", Obj::name))
                    .collect()
            })
            .collect();
        json!({
            "grid": grid,
            "agent": [self.agent.0, self.agent.1],
            "direction": self.direction_name(),
            "carrying": self.carrying.map(Obj::name),
            "mission": self.level.mission(),
            "max_steps": self.max_steps,
        })
    }

    /// The grid as text, one character per cell, for a model to read.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for y in 0..self.height {
            for x in 0..self.width {
                let c = if (x, y) == self.agent {
                    ['>', 'v', '<', '^'][self.dir as usize]
                } else {
                    self.get(x, y).map_or('.', Obj::glyph)
                };
                out.push(c);
            }
            out.push('\n');
        }
        out
    }

    /// A shortest action sequence to success, by breadth-first search over states; `None`
    /// when the level cannot be won within `max_steps`.
    pub fn shortest_solution(&self) -> Option<Vec<Action>> {
        use std::collections::{HashMap, VecDeque};
        type Key = ((i64, i64), u8, Option<Obj>, Vec<Option<Obj>>);
        let key = |e: &MiniGrid| -> Key { (e.agent, e.dir, e.carrying, e.cells.clone()) };
        let mut seen: HashMap<Key, ()> = HashMap::new();
        let mut queue = VecDeque::from([(self.clone(), Vec::new())]);
        seen.insert(key(self), ());
        let useful = [
            Action::Left,
            Action::Right,
            Action::Forward,
            Action::Pickup,
            Action::Toggle,
        ];
        while let Some((env, path)) = queue.pop_front() {
            for a in useful {
                let mut next = env.clone();
                let step = next.step(a);
                let mut p = path.clone();
                p.push(a);
                if step.terminated {
                    if step.reward > 0.0 {
                        return Some(p);
                    }
                    continue;
                }
                if step.truncated || seen.len() > 500_000 {
                    continue;
                }
                if seen.insert(key(&next), ()).is_none() {
                    queue.push_back((next, p));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for id in Level::IDS {
            let level = Level::parse(id).unwrap();
            assert_eq!(level.id(), id);
        }
        assert_eq!(
            Level::parse("doorkey-5x5"),
            Some(Level::DoorKey { size: 5 })
        );
        assert_eq!(Level::parse("MiniGrid-DoorKey-5x6-v0"), None);
    }

    #[test]
    fn every_level_is_solvable_and_the_solution_wins() {
        for id in Level::IDS {
            let level = Level::parse(id).unwrap();
            for seed in 0..3 {
                let env = MiniGrid::new(level, seed);
                let plan = env
                    .shortest_solution()
                    .unwrap_or_else(|| panic!("{id} {seed}"));
                let mut run = env.clone();
                let last = plan.iter().map(|&a| run.step(a)).last().unwrap();
                assert!(last.terminated && last.reward > 0.0, "{id} seed {seed}");
            }
        }
    }
}
