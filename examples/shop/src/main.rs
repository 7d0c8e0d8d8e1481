//! `shop`: the Sluice platform's command line with the shop domain (stock,
//! orders, the order saga) and nothing else.

use std::process::ExitCode;

use sluice_host::cli::NoCommands;

#[tokio::main]
async fn main() -> ExitCode {
    sluice_host::cli::main::<NoCommands>(
        sluice_host::App::new("shop").module(shop::module()),
        "A shop on Sluice: stock, orders and an order saga on NATS JetStream.",
    )
    .await
}
