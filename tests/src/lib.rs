//! hibiki's end-to-end tests live in `tests/`: the campaign chain across
//! gateway, contacts, scenario, delivery and analytics, with line-sim as
//! LINE.
#![forbid(unsafe_code)]
