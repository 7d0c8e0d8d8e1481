//! The ledger as a module of the host: what `sluice` hosts.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::{Value, json};
use sluice_host::http::openapi::{add_paths, err, header, ok, secured};
use sluice_host::{BoxError, Module, ModuleProjection, Role, RoleContext, RoleTask, RouteContext};
use sluice_projections::Database;

use crate::{
    AccountActivity, AccountBalances, Idempotency, IdempotencyConfig, TransferRoleConfig, Transfers,
};

/// The ledger: accounts, transfers, their read models and routes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ledger;

/// The ledger module, for [`sluice_host::App::module`].
///
/// ```
/// let app = sluice_host::App::new("sluice").module(sluice_ledger::module());
/// let names: Vec<_> = app.projections().iter().map(|p| p.name()).collect();
/// assert_eq!(names, ["account_balances", "account_activity", "transfers"]);
/// ```
pub fn module() -> Ledger {
    Ledger
}

impl Ledger {
    /// The roles' settings under the host's deployment settings.
    fn role_config(ctx: &RoleContext) -> TransferRoleConfig {
        let mut c = TransferRoleConfig::default();
        if let Some(d) = ctx.saga_deadline() {
            c.saga_deadline = d;
        }
        c.orchestrator.replicas = ctx.replicas();
        c.handler = ctx.worker(c.handler);
        c.orchestrator.worker = ctx.worker(c.orchestrator.worker);
        c
    }
}

impl Module for Ledger {
    fn name(&self) -> &'static str {
        "ledger"
    }

    fn catalog(&self) -> Result<sluice_events::Catalog, sluice_events::Error> {
        crate::catalog()
    }

    fn migrator(&self) -> Option<&'static sqlx::migrate::Migrator> {
        Some(&crate::service::MIGRATOR)
    }

    fn projections(&self) -> Vec<ModuleProjection> {
        vec![
            ModuleProjection::new(AccountBalances::new()),
            ModuleProjection::new(AccountActivity),
            ModuleProjection::new(Transfers),
        ]
    }

    fn roles(&self, ctx: &RoleContext) -> Vec<RoleTask> {
        let config = Arc::new(Self::role_config(ctx));
        let (store, shutdown) = (ctx.store.clone(), ctx.shutdown.clone());
        let handler = config.handler.clone();
        let worker = RoleTask::new(Role::Worker, crate::ACCOUNT_COMMANDS, {
            let (store, shutdown) = (store.clone(), shutdown.clone());
            async move { crate::run_account_commands(&store, handler, shutdown).await }
        });
        let saga = RoleTask::new(Role::Saga, crate::TRANSFER_ORCHESTRATOR, async move {
            crate::run_transfer_orchestrator(&store, &config, shutdown).await
        });
        vec![worker, saga]
    }

    fn provision<'a>(
        &'a self,
        ctx: &'a RoleContext,
    ) -> BoxFuture<'a, Result<Vec<String>, BoxError>> {
        Box::pin(async move {
            let roles = Self::role_config(ctx);
            sluice_workers::ensure_consumers(&ctx.store, &roles.handler).await?;
            sluice_sagas::ensure_timers_stream(&ctx.store, roles.orchestrator.replicas).await?;
            Idempotency::open(&ctx.store, idempotency_config(ctx.replicas(), None)).await?;
            Ok([
                "DLQ",
                "redrive",
                "audit",
                "advisories",
                "parked bucket",
                "idempotency bucket",
                "SAGA_TIMERS",
            ]
            .map(str::to_owned)
            .to_vec())
        })
    }

    fn routes<'a>(
        &'a self,
        ctx: &'a RouteContext,
    ) -> BoxFuture<'a, Result<axum::Router, BoxError>> {
        Box::pin(async move {
            let config = idempotency_config(ctx.replicas(), Some(ctx.idempotency_retention()));
            let idempotency = Idempotency::open(&ctx.store, config).await?;
            Ok(crate::routes::routes(ctx.store.clone(), idempotency))
        })
    }

    fn openapi(&self, doc: &mut Value) {
        let secured = secured();
        let operator_body = json!({"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["note"],
            "properties": {"note": {"type": "string", "minLength": 1}}}}}});
        let resolve_body = json!({"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["note", "outcome"],
            "properties": {"note": {"type": "string", "minLength": 1}, "outcome": {"enum": ["completed", "compensated"]}}}}}});
        let key = header(
            "Idempotency-Key",
            "1-64 letters, digits, '_' or '-': a repeat of the same request answers the first response",
        );
        let amount_body = json!({"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["amount"], "additionalProperties": false,
            "properties": {"amount": {"type": "integer", "minimum": 1, "description": "minor units"}}}}}});
        add_paths(
            doc,
            json!({
                "/v1/transfers": {
                    "get": {"summary": "Transfers (filter state: pending, completed, compensated, needs_attention, abandoned)",
                            "parameters": [{"name": "state", "in": "query", "required": false,
                                            "schema": {"enum": ["pending", "completed", "compensated", "needs_attention", "abandoned"]}}],
                            "responses": {"200": ok("transfers"), "400": err("unknown state")}},
                    "post": {"summary": "Start a transfer saga (id = idempotency key)", "security": secured,
                             "parameters": [key.clone()],
                             "requestBody": {"content": {"application/json": {"schema": {"type": "object", "required": ["from", "to", "amount"],
                                "properties": {"from": {"type": "string"}, "to": {"type": "string"}, "amount": {"type": "integer", "minimum": 1}, "id": {"type": "string"}}}}}},
                             "responses": {"202": {"description": "started: {id, position, created}", "headers": {"Location": {"description": "the transfer: /v1/transfers/{id}", "schema": {"type": "string"}}},
                                 "content": {"application/json": {"schema": {"type": "object"}}}}, "200": ok("already started"), "400": err("invalid input"), "401": err("no or wrong token"), "422": err("refused by a rule (positive amount, two accounts)")}}
                },
                "/v1/accounts": {"post": {"summary": "Open an account (Idempotency-Key)", "security": secured,
                    "parameters": [key.clone()],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["owner", "currency"], "additionalProperties": false,
                        "properties": {"owner": {"type": "string"}, "currency": {"type": "string"}, "id": {"type": "string"}}}}}},
                    "responses": {"201": ok("opened (a repeat with the same key: the first response, Idempotent-Replayed: true)"), "404": err("no such account"), "409": err("already open, a version conflict, or the key's first request still in progress"), "422": err("refused by a rule (rule), or the key used for another request")}}},
                "/v1/accounts/{id}/deposits": {"post": {"summary": "Deposit (Idempotency-Key)", "security": secured,
                    "parameters": [key.clone()], "requestBody": amount_body.clone(),
                    "responses": {"201": ok("deposited (a repeat with the same key: the first response, Idempotent-Replayed: true)"), "404": err("no such account"), "409": err("already open, a version conflict, or the key's first request still in progress"), "422": err("refused by a rule (rule), or the key used for another request")}}},
                "/v1/accounts/{id}/withdrawals": {"post": {"summary": "Withdraw, never below zero (Idempotency-Key)", "security": secured,
                    "parameters": [key.clone()], "requestBody": amount_body,
                    "responses": {"201": ok("withdrawn (a repeat with the same key: the first response, Idempotent-Replayed: true)"), "404": err("no such account"), "409": err("already open, a version conflict, or the key's first request still in progress"), "422": err("refused by a rule (rule), or the key used for another request")}}},
                "/v1/transfers/{id}": {"get": {"summary": "One transfer's state", "responses": {"200": ok("transfer"), "404": err("unknown transfer")}}},
                "/v1/sagas/{id}/retry": {"post": {"summary": "Send the command a transfer that needs attention is stuck on again (next attempt; money moves at most once per step)", "security": secured,
                    "requestBody": operator_body.clone(),
                    "responses": {"200": ok("the transfer after the retry"), "400": err("no note"), "401": err("no or wrong token"), "404": err("unknown transfer"), "409": err("the transfer does not need attention (the detail names its state)")}}},
                "/v1/sagas/{id}/resolve": {"post": {"summary": "State the outcome (completed or compensated) of a transfer that needs attention; nothing moves", "security": secured,
                    "requestBody": resolve_body,
                    "responses": {"200": ok("the transfer after it"), "400": err("no note or outcome"), "401": err("no or wrong token"), "404": err("unknown transfer"), "409": err("the transfer does not need attention (the detail names its state)")}}},
                "/v1/sagas/{id}/abandon": {"post": {"summary": "Stop a transfer that needs attention without acting (fixed by hand); nothing moves", "security": secured,
                    "requestBody": operator_body,
                    "responses": {"200": ok("the transfer after it"), "400": err("no note"), "401": err("no or wrong token"), "404": err("unknown transfer"), "409": err("the transfer does not need attention (the detail names its state)")}}}
            }),
        );
    }

    fn refresh_metrics<'a>(&'a self, db: &'a Database) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            match crate::transfer_counts(db).await {
                Ok(counts) => {
                    for (state, n) in counts {
                        metrics::gauge!("sluice_sagas", "saga" => "transfer", "state" => state)
                            .set(n as f64);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not count transfers by state"),
            }
        })
    }
}

/// The idempotency records' settings: `retention` (default 24 h) and the
/// event stream's replicas.
fn idempotency_config(
    replicas: usize,
    retention: Option<std::time::Duration>,
) -> IdempotencyConfig {
    let mut c = IdempotencyConfig {
        replicas,
        ..IdempotencyConfig::default()
    };
    if let Some(r) = retention {
        c.retention = r;
    }
    c
}
