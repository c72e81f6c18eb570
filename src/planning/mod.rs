//! Code-driven planning (IPP): environments with known scoring, and the loop in which a model
//! writes a program as its policy, the program runs in the sandbox, and the worst failures
//! are fed back until it is good enough to reuse across instances.

pub mod minigrid;
pub mod nprand;
