//! crest checkpoint/restart engine.
