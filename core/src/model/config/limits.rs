//! Upper bounds on `config.json`'s sizes, well above every released model
//! (hidden sizes reach 16384, expert intermediate sizes 20480, layers and
//! experts per layer a few hundred) and low enough that a hostile config
//! cannot make a node allocate without bound: a table sized from the
//! config alone (per layer and expert, say) stays below a few hundred
//! megabytes, and size products cannot overflow.

/// Largest `hidden_size`.
pub const MAX_HIDDEN_SIZE: usize = 1 << 16;
/// Largest intermediate size of one expert, routed or shared.
pub const MAX_INTERMEDIATE_SIZE: usize = 1 << 18;
/// Largest `num_hidden_layers`.
pub const MAX_LAYERS: usize = 1 << 10;
/// Largest number of routed experts per layer.
pub const MAX_EXPERTS: usize = 1 << 14;
/// Largest `routed_scaling_factor`; released models use 1 to 16.
pub const MAX_ROUTED_SCALING_FACTOR: f32 = 1000.0;
