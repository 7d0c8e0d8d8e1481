//! The shop as a module of `sluice-host`: what the `shop` binary hosts.

use futures::future::BoxFuture;
use serde_json::Value;
use sluice_host::http::openapi::add_paths;
use sluice_host::{BoxError, Module, ModuleProjection, Role, RoleContext, RoleTask, RouteContext};
use sluice_workers::WorkerConfig;

use crate::{ORDER_ORCHESTRATOR, OrderConfig, Orders, STOCK_COMMANDS, StockLevels};

/// The shop's OpenAPI paths (`examples/shop/openapi.json`).
const OPENAPI_PATHS: &str = include_str!("../openapi.json");

/// The shop: stock, orders, the order saga, their read models and routes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shop;

/// The shop module, for [`sluice_host::App::module`].
///
/// ```
/// let app = sluice_host::App::new("shop").module(shop::module());
/// let names: Vec<_> = app.projections().iter().map(|p| p.name()).collect();
/// assert_eq!(names, ["stock_levels", "orders"]);
/// ```
pub fn module() -> Shop {
    Shop
}

impl Shop {
    /// The stock handler's and the orchestrator's settings under the
    /// host's deployment settings.
    fn role_config(ctx: &RoleContext) -> (WorkerConfig, OrderConfig) {
        let mut order = OrderConfig::default();
        if let Some(d) = ctx.saga_deadline() {
            order.saga_deadline = d;
        }
        order.orchestrator.replicas = ctx.replicas();
        order.orchestrator.worker = ctx.worker(order.orchestrator.worker);
        (ctx.worker(WorkerConfig::new(STOCK_COMMANDS)), order)
    }
}

impl Module for Shop {
    fn name(&self) -> &'static str {
        "shop"
    }

    fn catalog(&self) -> Result<sluice_events::Catalog, sluice_events::Error> {
        crate::catalog()
    }

    fn migrator(&self) -> Option<&'static sqlx::migrate::Migrator> {
        Some(&crate::MIGRATOR)
    }

    fn projections(&self) -> Vec<ModuleProjection> {
        vec![
            ModuleProjection::new(StockLevels),
            ModuleProjection::new(Orders),
        ]
    }

    fn roles(&self, ctx: &RoleContext) -> Vec<RoleTask> {
        let (handler, order) = Self::role_config(ctx);
        let (store, shutdown) = (ctx.store.clone(), ctx.shutdown.clone());
        let worker = RoleTask::new(Role::Worker, STOCK_COMMANDS, {
            let (store, shutdown) = (store.clone(), shutdown.clone());
            async move { crate::run_stock_commands(&store, handler, shutdown).await }
        });
        let saga = RoleTask::new(Role::Saga, ORDER_ORCHESTRATOR, async move {
            crate::run_order_orchestrator(&store, &order, shutdown).await
        });
        vec![worker, saga]
    }

    fn provision<'a>(
        &'a self,
        ctx: &'a RoleContext,
    ) -> BoxFuture<'a, Result<Vec<String>, BoxError>> {
        Box::pin(async move {
            let (handler, order) = Self::role_config(ctx);
            sluice_workers::ensure_consumers(&ctx.store, &handler).await?;
            sluice_sagas::ensure_timers_stream(&ctx.store, order.orchestrator.replicas).await?;
            Ok([
                "DLQ",
                "redrive",
                "audit",
                "advisories",
                "parked bucket",
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
        Box::pin(async move { Ok(crate::routes(ctx.store.clone())) })
    }

    fn openapi(&self, doc: &mut Value) {
        // A malformed file adds nothing (the unit test of the paths fails).
        add_paths(doc, serde_json::from_str(OPENAPI_PATHS).unwrap_or_default());
    }
}
