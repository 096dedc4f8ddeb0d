//! VM runner.
