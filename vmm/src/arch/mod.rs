//! Architecture-specific set-up. Popek is x86-64 only.
pub mod x86_64;
