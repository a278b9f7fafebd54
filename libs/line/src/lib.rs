//! The LINE platform as hibiki speaks it (`../shared/LINE.md`): the webhook
//! signature, the Messaging API's endpoints and their limits, its error
//! body, and the shape of ids and retry keys. Shared by the gateway (which
//! verifies webhooks), delivery (which calls the API) and line-sim (which
//! plays LINE for development, tests and benchmarks).
#![forbid(unsafe_code)]

pub mod api;
pub mod signature;
