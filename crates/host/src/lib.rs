//! The Sluice host: what runs a domain on the platform.
//!
//! It owns everything that is not a domain: the embedded nats-server and
//! the roles (`up`, `serve --role ...`), the HTTP API with its security
//! layers and OpenAPI document, the operator commands (`publish`, `read`,
//! `tail`, `status`, `dlq`, `consumer`, `projection`, `replay`, `event`,
//! `token`), provisioning and telemetry. A domain implements [`Module`];
//! its binary's `main` is one call to [`cli::main`] with an [`App`] of its
//! modules, and a program or a test runs the same `up`/`serve` in-process
//! with [`run`].
#![warn(clippy::unwrap_used)]

pub mod cli;
mod config;
mod consumer_cmd;
mod dlq_cmd;
mod endpoint;
mod error;
pub mod http;
mod module;
mod nats_lint;
mod private_file;
mod projection_cmd;
pub mod projection_ops;
mod provision;
mod status_cmd;
mod stream_cmd;
mod telemetry;
mod tokens;
mod up;

pub use error::Error;
pub use module::{
    App, BoxError, DEFAULT_STEP_DEADLINE, Module, ModuleProjection, Role, RoleContext, RoleTask,
    RouteContext,
};
pub use projection_ops::ReadSide;
pub use stream_cmd::id_arg;
pub use up::{Mode, RunConfig, Running, run};
