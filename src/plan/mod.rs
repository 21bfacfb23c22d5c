//! The plan: which tables move (selection rules resolved against the catalog) and in which chunks.

pub mod chunk;
pub mod select;

pub use chunk::{ChunkMethod, ChunkSpec};
pub use select::{Pattern, PatternError, Selection};
