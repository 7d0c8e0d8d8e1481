//! Sagas against a real nats-server: the ledger's transfer flow end to end,
//! crashes of the orchestrator, replicas, timeouts that fire while no
//! orchestrator runs, late timeouts and late commands, and compensations that
//! cannot succeed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use sluice_events::{EventStore, StreamId, execute, load};
use sluice_ledger::{
    Account, AccountCommand, DEPOSITED, TRANSFER_SAGA, TransferRoleConfig, TransferState,
    Transfers, WITHDRAWN, run_account_commands, run_transfer_orchestrator, run_transfer_role,
    start_transfer, transfer_status,
};
use sluice_projections::{Database, ReadModel, RunnerConfig};
use sluice_sagas::{SagaEvent, TIMERS_STREAM, read_log};
use sluice_testkit::NatsServer;
use sluice_workers::{RetryPolicy, WorkerConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

// Durable names used here (constants: renaming one re-consumes every event).
const SRC_COMMANDS: &str = "test-src-commands";
const DST_COMMANDS: &str = "test-dst-commands";

/// Short timings so the suite stays fast; the ratios the worker runtime
/// checks (retry cap < ack wait < pin timeout) still hold.
fn fast(mut c: WorkerConfig) -> WorkerConfig {
    c.ack_wait = Duration::from_secs(2);
    c.pin_timeout = Duration::from_secs(3);
    c.redelivery_settle = Duration::from_millis(100);
    c.retry = RetryPolicy {
        base: Duration::from_millis(50),
        cap: Duration::from_secs(1),
        max_attempts: 5,
    };
    c
}

fn role(deadline: Duration) -> TransferRoleConfig {
    let mut c = TransferRoleConfig::default();
    c.orchestrator.worker = fast(c.orchestrator.worker);
    c.orchestrator.timer_retry = Duration::from_millis(200);
    c.handler = fast(c.handler);
    c.deadline = deadline;
    c
}

/// A command handler serving only `account`'s commands (to stall others).
fn handler_for(name: &'static str, account: &str) -> WorkerConfig {
    let mut c = fast(WorkerConfig::new(name));
    c.filter_subjects = vec![format!("events.cmd-account.{account}")];
    c
}

struct Running {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

fn spawn<F, Fut>(f: F) -> Running
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), sluice_sagas::SagaError>> + Send + 'static,
{
    let cancel = CancellationToken::new();
    let fut = f(cancel.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = fut.await {
            panic!("saga role failed: {e}");
        }
    });
    Running { cancel, task }
}

fn role_task(store: &EventStore, config: TransferRoleConfig) -> Running {
    let store = store.clone();
    spawn(move |c| async move { run_transfer_role(&store, config, c).await })
}

fn orchestrator_task(store: &EventStore, config: TransferRoleConfig) -> Running {
    let store = store.clone();
    spawn(move |c| async move { run_transfer_orchestrator(&store, &config, c).await })
}

fn handler_task(store: &EventStore, config: WorkerConfig) -> Running {
    let store = store.clone();
    spawn(move |c| async move { run_account_commands(&store, config, c).await })
}

async fn open(store: &EventStore, id: &str, currency: &str, deposit: i64) {
    execute::<Account>(
        store,
        id,
        &AccountCommand::Open {
            owner: format!("owner of {id}"),
            currency: currency.into(),
        },
        3,
    )
    .await
    .unwrap();
    if deposit > 0 {
        execute::<Account>(
            store,
            id,
            &AccountCommand::Deposit {
                amount: deposit,
                currency: None,
            },
            3,
        )
        .await
        .unwrap();
    }
}

async fn close(store: &EventStore, id: &str) {
    execute::<Account>(store, id, &AccountCommand::Close, 3)
        .await
        .unwrap();
}

async fn balance(store: &EventStore, id: &str) -> i64 {
    let (a, _) = load::<Account>(store, &StreamId::new("account", id).unwrap())
        .await
        .unwrap();
    a.balance()
}

/// Event types of a stream, in order.
async fn types(store: &EventStore, category: &str, id: &str) -> Vec<String> {
    store
        .read(&StreamId::new(category, id).unwrap(), 1)
        .await
        .unwrap()
        .map_ok(|e| e.envelope.event_type)
        .try_collect()
        .await
        .unwrap()
}

async fn saga_events(store: &EventStore, id: &str) -> Vec<SagaEvent> {
    read_log(store, TRANSFER_SAGA, id)
        .await
        .unwrap()
        .records
        .into_iter()
        .map(|r| r.event)
        .collect()
}

async fn wait_state(store: &EventStore, id: &str, state: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let view = transfer_status(store, id).await.unwrap();
        if let Some(v) = view.as_ref().filter(|v| v.state == state) {
            return v.reason.clone().unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "transfer {id} not {state} after {timeout:?}: {view:?}\n{:?}",
            saga_events(store, id).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kinds(events: &[SagaEvent]) -> Vec<&'static str> {
    events.iter().map(sluice_sagas::event_type).collect()
}

const HAPPY: [&str; 5] = [
    sluice_sagas::STARTED,
    sluice_sagas::STEP_CLAIMED,
    sluice_sagas::STEP_SUCCEEDED,
    sluice_sagas::STEP_CLAIMED,
    sluice_sagas::STEP_SUCCEEDED,
];

#[tokio::test]
async fn a_transfer_moves_money_once_and_a_repeated_start_starts_nothing() {
    let nats = NatsServer::start();
    let store = nats.store().await;
    open(&store, "a", "EUR", 100).await;
    open(&store, "b", "EUR", 0).await;
    let role = role_task(&store, role(Duration::from_secs(30)));

    let t = start_transfer(&store, Some("t-1"), "a", "b", 40)
        .await
        .unwrap();
    assert!(t.created);
    let again = start_transfer(&store, Some("t-1"), "a", "b", 40)
        .await
        .unwrap();
    assert_eq!((again.created, again.position), (false, t.position));
    wait_state(&store, "t-1", "completed", Duration::from_secs(20)).await;

    assert_eq!(
        (balance(&store, "a").await, balance(&store, "b").await),
        (60, 40)
    );
    assert_eq!(kinds(&saga_events(&store, "t-1").await), HAPPY);
    let view = transfer_status(&store, "t-1").await.unwrap().unwrap();
    assert_eq!(
        (view.from.as_str(), view.to.as_str(), view.amount),
        ("a", "b", 40)
    );
    // The money moved through the events the read models already know,
    // tagged with the transfer.
    let src: Vec<_> = store
        .read(&StreamId::new("account", "a").unwrap(), 1)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let debit = src.last().unwrap();
    assert_eq!(debit.envelope.event_type, WITHDRAWN);
    assert_eq!(debit.envelope.correlation_id.as_deref(), Some("t-1"));
    assert_eq!(debit.envelope.causation_id.as_deref(), Some("t-1/debit"));
    role.stop().await;
}

#[tokio::test]
async fn refused_credits_refund_the_source() {
    let nats = NatsServer::start();
    let store = nats.store().await;
    open(&store, "a", "EUR", 100).await;
    open(&store, "closed", "EUR", 0).await;
    close(&store, "closed").await;
    open(&store, "usd", "USD", 0).await;
    let role = role_task(&store, role(Duration::from_secs(30)));

    for (id, to, why) in [
        ("t-closed", "closed", "closed"),
        ("t-usd", "usd", "currency mismatch"),
        ("t-unknown", "nobody", "does not exist"),
    ] {
        start_transfer(&store, Some(id), "a", to, 30).await.unwrap();
        let reason = wait_state(&store, id, "compensated", Duration::from_secs(20)).await;
        assert!(reason.contains(why), "{id}: {reason}");
    }
    // Not enough money: the debit fails, nothing to undo.
    start_transfer(&store, Some("t-poor"), "a", "usd", 1000)
        .await
        .unwrap();
    let reason = wait_state(&store, "t-poor", "compensated", Duration::from_secs(20)).await;
    assert!(reason.contains("insufficient funds"), "{reason}");

    assert_eq!(balance(&store, "a").await, 100);
    assert_eq!(balance(&store, "usd").await, 0);
    // Three debits and three refunds, nothing else.
    let a = types(&store, "account", "a").await;
    assert_eq!(a.iter().filter(|t| *t == WITHDRAWN).count(), 3);
    assert_eq!(a.iter().filter(|t| *t == DEPOSITED).count(), 1 + 3);
    role.stop().await;

    // The `transfers` read model (SQLite) says the same.
    let dir = tempfile::tempdir().unwrap();
    let db = Database::connect(&format!(
        "sqlite://{}",
        dir.path().join("read.db").display()
    ))
    .await
    .unwrap();
    sluice_ledger::migrate(&db).await.unwrap();
    let shutdown = CancellationToken::new();
    let running = sluice_projections::spawn(
        Arc::new(Transfers),
        db.clone(),
        store.clone(),
        RunnerConfig::default(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    wait_for(
        "the transfers read model",
        Duration::from_secs(20),
        async || {
            Transfers
                .list(&mut conn, None, 10)
                .await
                .unwrap()
                .rows
                .len()
                == 4
        },
    )
    .await;
    wait_for(
        "every transfer compensated",
        Duration::from_secs(20),
        async || {
            let rows = Transfers.list(&mut conn, None, 10).await.unwrap().rows;
            rows.iter().all(|r| r["state"] == "compensated")
        },
    )
    .await;
    let listed = sluice_ledger::list_transfers(&store, Some(TransferState::Compensated))
        .await
        .unwrap();
    let ids: Vec<&str> = listed.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(ids, ["t-closed", "t-poor", "t-unknown", "t-usd"]);
    assert!(
        sluice_ledger::list_transfers(&store, Some(TransferState::Completed))
            .await
            .unwrap()
            .is_empty()
    );
    let row = Transfers.get(&mut conn, "t-closed").await.unwrap().unwrap();
    assert_eq!(
        (
            row["from"].as_str(),
            row["to"].as_str(),
            row["amount"].as_i64()
        ),
        (Some("a"), Some("closed"), Some(30))
    );
    assert!(row["reason"].as_str().unwrap().contains("closed"), "{row}");
    drop(conn);
    shutdown.cancel();
    let _ = running.task.await;
}

#[tokio::test]
async fn a_transition_stored_but_not_sent_goes_out_once_after_restart() {
    let nats = NatsServer::start();
    let store = nats.store().await;
    open(&store, "a", "EUR", 100).await;
    open(&store, "b", "EUR", 0).await;
    let handler = handler_task(
        &store,
        fast(WorkerConfig::new(sluice_ledger::ACCOUNT_COMMANDS)),
    );

    // No orchestrator runs: the transition is durable, its command unsent,
    // which is exactly what a kill between the two leaves behind.
    start_transfer(&store, Some("t-crash"), "a", "b", 25)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(types(&store, "cmd-account", "a").await.is_empty());
    assert_eq!(balance(&store, "a").await, 100);

    // And a previous orchestrator that did send it but died before its ack:
    // the restarted one sends the same command id again.
    let log = read_log(&store, TRANSFER_SAGA, "t-crash").await.unwrap();
    let def = sluice_ledger::transfer_definition(Duration::from_secs(30)).unwrap();
    let (_, commands) = log.fold(&def).unwrap();
    sluice_sagas::send_command(&store, TRANSFER_SAGA, "t-crash", &commands[0][0])
        .await
        .unwrap();

    let config = role(Duration::from_secs(30));
    let first = orchestrator_task(&store, config.clone());
    // A second replica on the same instances, started at once.
    let second = orchestrator_task(&store, config);
    wait_state(&store, "t-crash", "completed", Duration::from_secs(30)).await;
    assert_eq!(
        types(&store, "cmd-account", "a").await.len(),
        1,
        "debit sent once"
    );
    assert_eq!(
        types(&store, "cmd-account", "b").await.len(),
        1,
        "credit sent once"
    );
    assert_eq!(
        (balance(&store, "a").await, balance(&store, "b").await),
        (75, 25)
    );
    assert_eq!(kinds(&saga_events(&store, "t-crash").await), HAPPY);
    first.stop().await;
    second.stop().await;
    handler.stop().await;
}

#[tokio::test]
async fn two_replicas_advance_each_instance_once() {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let other = nats.store().await;
    open(&store, "a", "EUR", 1_000).await;
    open(&store, "b", "EUR", 0).await;
    open(&store, "c", "EUR", 0).await;
    close(&store, "c").await;
    let config = role(Duration::from_secs(30));
    let r1 = role_task(&store, config.clone());
    let r2 = role_task(&other, config);

    let n = 20;
    for i in 0..n {
        // Every fourth one compensates.
        let to = if i % 4 == 3 { "c" } else { "b" };
        start_transfer(&store, Some(&format!("t-{i}")), "a", to, 10)
            .await
            .unwrap();
    }
    let mut completed = 0;
    for i in 0..n {
        let id = format!("t-{i}");
        let state = if i % 4 == 3 {
            "compensated"
        } else {
            "completed"
        };
        wait_state(&store, &id, state, Duration::from_secs(40)).await;
        let events = saga_events(&store, &id).await;
        if state == "completed" {
            completed += 1;
            assert_eq!(kinds(&events), HAPPY, "{id}");
        } else {
            assert_eq!(
                kinds(&events),
                [
                    sluice_sagas::STARTED,
                    sluice_sagas::STEP_CLAIMED,
                    sluice_sagas::STEP_SUCCEEDED,
                    sluice_sagas::STEP_FAILED,
                    sluice_sagas::COMPENSATION_SUCCEEDED,
                ],
                "{id}"
            );
        }
    }
    assert_eq!(balance(&store, "b").await, completed * 10);
    assert_eq!(balance(&store, "a").await, 1_000 - completed * 10);
    let a = types(&store, "account", "a").await;
    assert_eq!(a.iter().filter(|t| *t == WITHDRAWN).count(), n);
    r1.stop().await;
    r2.stop().await;
}

#[tokio::test]
async fn a_timeout_that_fires_while_no_orchestrator_runs_compensates_after_restart() {
    let nats = NatsServer::start();
    let store = nats.store().await;
    open(&store, "src", "EUR", 100).await;
    open(&store, "dst", "EUR", 0).await;
    let config = role(Duration::from_secs(2));
    // Only the source's commands are handled: the credit stalls.
    let src = handler_task(&store, handler_for(SRC_COMMANDS, "src"));
    let orchestrator = orchestrator_task(&store, config.clone());
    start_transfer(&store, Some("t-late"), "src", "dst", 60)
        .await
        .unwrap();
    wait_for("the credit command", Duration::from_secs(20), async || {
        !types(&store, "cmd-account", "dst").await.is_empty()
    })
    .await;
    orchestrator.stop().await;
    assert_eq!(balance(&store, "src").await, 40);

    // The deadline (2 s) passes while no orchestrator runs.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        transfer_status(&store, "t-late")
            .await
            .unwrap()
            .unwrap()
            .state,
        "pending"
    );
    let orchestrator = orchestrator_task(&store, config);
    let reason = wait_state(&store, "t-late", "compensated", Duration::from_secs(20)).await;
    assert!(reason.contains("timed out"), "{reason}");
    assert_eq!(balance(&store, "src").await, 100);

    // The target's handler comes back: the late credit must not apply.
    let dst = handler_task(&store, handler_for(DST_COMMANDS, "dst"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(balance(&store, "dst").await, 0);
    assert!(
        !types(&store, "account", "dst")
            .await
            .contains(&DEPOSITED.to_owned())
    );
    assert_eq!(
        transfer_status(&store, "t-late")
            .await
            .unwrap()
            .unwrap()
            .state,
        "compensated"
    );
    for r in [orchestrator, src, dst] {
        r.stop().await;
    }
}

#[tokio::test]
async fn a_late_timeout_for_a_completed_step_is_ignored() {
    let nats = NatsServer::start();
    let store = nats.store().await;
    open(&store, "a", "EUR", 100).await;
    open(&store, "b", "EUR", 0).await;
    let role = role_task(&store, role(Duration::from_secs(3)));
    start_transfer(&store, Some("t-quick"), "a", "b", 10)
        .await
        .unwrap();
    wait_state(&store, "t-quick", "completed", Duration::from_secs(20)).await;

    // Both deadlines fire after their steps completed.
    let js = store.jetstream();
    wait_for(
        "both deadlines to fire",
        Duration::from_secs(10),
        async || {
            let mut stream = js.get_stream(TIMERS_STREAM).await.unwrap();
            let info = stream.info().await.unwrap();
            // The schedules are gone once fired; the saga's overall
            // deadline (5 minutes) is still scheduled.
            let scheduled = info.state.messages;
            let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
                .get_consumer("ledger-transfer-saga-timers")
                .await
                .unwrap();
            let c = consumer.info().await.unwrap();
            c.delivered.consumer_sequence >= 2
                && c.ack_floor.consumer_sequence >= 2
                && scheduled == 3
        },
    )
    .await;
    let events = saga_events(&store, "t-quick").await;
    assert_eq!(kinds(&events), HAPPY);
    assert_eq!(balance(&store, "b").await, 10);
    role.stop().await;
}

#[tokio::test]
async fn a_refund_that_cannot_succeed_needs_attention() {
    let nats = NatsServer::start();
    let store = nats.store().await;
    open(&store, "src", "EUR", 100).await;
    open(&store, "dst", "EUR", 0).await;
    close(&store, "dst").await;
    let config = role(Duration::from_secs(30));
    let orchestrator = orchestrator_task(&store, config);
    let src = handler_task(&store, handler_for(SRC_COMMANDS, "src"));
    start_transfer(&store, Some("t-stuck"), "src", "dst", 100)
        .await
        .unwrap();
    wait_for("the debit", Duration::from_secs(20), async || {
        balance(&store, "src").await == 0
    })
    .await;
    // The source is closed while the money is in flight: the refund will
    // be refused for good.
    close(&store, "src").await;
    let dst = handler_task(&store, handler_for(DST_COMMANDS, "dst"));
    let reason = wait_state(
        &store,
        "t-stuck",
        "needs_attention",
        Duration::from_secs(20),
    )
    .await;
    assert!(
        reason.contains("compensation of step debit failed permanently"),
        "{reason}"
    );
    assert!(reason.contains("closed"), "{reason}");

    // An operator retry sends the refund again (attempt 2); the source is
    // still closed, so it needs attention again, with the money still out
    // of reach (nothing half-done, nothing silent).
    let retried = sluice_ledger::retry_transfer(&store, "t-stuck", "operator")
        .await
        .unwrap();
    assert_eq!(retried.state, "pending");
    wait_for(
        "the retried refund to fail",
        Duration::from_secs(20),
        async || {
            saga_events(&store, "t-stuck").await.iter().any(|e| {
                matches!(
                    e,
                    SagaEvent::CompensationFailed {
                        attempt: 2,
                        permanent: true,
                        ..
                    }
                )
            })
        },
    )
    .await;
    wait_state(&store, "t-stuck", "needs_attention", Duration::from_secs(5)).await;
    assert_eq!(balance(&store, "src").await, 0);
    // Retrying a saga that does not need attention is refused.
    let unknown = sluice_ledger::retry_transfer(&store, "t-1-unknown", "operator")
        .await
        .unwrap_err();
    assert!(unknown.is_unknown_instance(), "{unknown}");
    for r in [orchestrator, src, dst] {
        r.stop().await;
    }
}

#[tokio::test]
async fn a_refund_failing_transiently_is_retried_and_applies_once() {
    let nats = NatsServer::start();
    let store = nats.store().await;
    open(&store, "src", "EUR", 100).await;
    open(&store, "dst", "EUR", 0).await;
    close(&store, "dst").await;
    let orchestrator = orchestrator_task(&store, role(Duration::from_secs(30)));
    let src = handler_task(&store, handler_for(SRC_COMMANDS, "src"));
    start_transfer(&store, Some("t-flaky"), "src", "dst", 100)
        .await
        .unwrap();
    wait_for("the debit", Duration::from_secs(20), async || {
        balance(&store, "src").await == 0
    })
    .await;
    // The source's handler goes away; the credit is refused, the refund
    // (attempt 1) waits on the source's command subject.
    src.stop().await;
    let dst = handler_task(&store, handler_for(DST_COMMANDS, "dst"));
    wait_for("the first refund", Duration::from_secs(20), async || {
        types(&store, "cmd-account", "src").await.len() == 2
    })
    .await;
    // Two transient failures reported (what a handler records after its
    // own retries ran out): each sends the next attempt.
    for attempt in 1..=2 {
        let guarded = sluice_sagas::append_guarded(&store, TRANSFER_SAGA, "t-flaky", |_| {
            Ok((
                SagaEvent::CompensationFailed {
                    step: 0,
                    attempt,
                    reason: "database unavailable".into(),
                    permanent: false,
                },
                format!("t-flaky/debit/{attempt}/undo/reply"),
            ))
        })
        .await
        .unwrap();
        assert!(matches!(guarded, sluice_sagas::Guarded::Appended(_)));
        wait_for(
            "the next refund attempt",
            Duration::from_secs(20),
            async || types(&store, "cmd-account", "src").await.len() == 2 + attempt as usize,
        )
        .await;
    }
    // The source's handler is back: attempts 1 and 2 are answered already,
    // attempt 3 refunds, once.
    let src = handler_task(&store, handler_for(SRC_COMMANDS, "src"));
    wait_state(&store, "t-flaky", "compensated", Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(balance(&store, "src").await, 100);
    let deposits = types(&store, "account", "src")
        .await
        .into_iter()
        .filter(|t| t == DEPOSITED)
        .count();
    assert_eq!(deposits, 2, "the first deposit and one refund");
    for r in [orchestrator, src, dst] {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_is_conserved_across_concurrent_transfers_and_orchestrator_restarts() {
    let nats = NatsServer::start();
    let store = nats.store().await;
    let accounts: Vec<String> = (0..20).map(|i| format!("acc-{i}")).collect();
    for a in &accounts {
        open(&store, a, "EUR", 1_000).await;
    }
    open(&store, "gone", "EUR", 0).await;
    close(&store, "gone").await;
    let config = role(Duration::from_secs(30));
    let handler = handler_task(&store, config.handler.clone());
    let mut orchestrator = orchestrator_task(&store, config.clone());

    // A small deterministic generator: the same run every time.
    let mut seed: u64 = 0x5eed;
    let mut next = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let n = 200;
    let mut starts = Vec::new();
    for i in 0..n {
        let from = accounts[next(20) as usize].clone();
        // One in ten fails at the credit step (closed target).
        let to = if next(10) == 0 {
            "gone".to_owned()
        } else {
            let mut to = accounts[next(20) as usize].clone();
            if to == from {
                to = accounts[(accounts.iter().position(|a| *a == from).unwrap() + 1) % 20].clone();
            }
            to
        };
        let amount = 1 + next(300) as i64;
        let store = store.clone();
        starts.push(tokio::spawn(async move {
            start_transfer(&store, Some(&format!("c-{i}")), &from, &to, amount)
                .await
                .unwrap();
        }));
    }
    // Restart the orchestrator twice while the transfers run.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        orchestrator.stop().await;
        orchestrator = orchestrator_task(&store, config.clone());
    }
    for s in starts {
        s.await.unwrap();
    }
    let mut states = std::collections::HashMap::new();
    for i in 0..n {
        let id = format!("c-{i}");
        let deadline = Instant::now() + Duration::from_secs(40);
        let state = loop {
            let v = transfer_status(&store, &id).await.unwrap().unwrap();
            if v.state == "completed" || v.state == "compensated" {
                break v.state;
            }
            assert!(Instant::now() < deadline, "{id} stuck: {v:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        *states.entry(state).or_insert(0) += 1;
    }
    assert!(
        states.get("completed").copied().unwrap_or(0) > n / 2,
        "{states:?}"
    );
    assert!(
        states.get("compensated").copied().unwrap_or(0) >= n / 20,
        "{states:?}"
    );

    assert_conserved(&store, &accounts, 20 * 1_000).await;
    orchestrator.stop().await;
    handler.stop().await;
}

/// Money is conserved, no balance is negative at any event of the log, and
/// no effect (causation key) was applied twice.
async fn assert_conserved(store: &EventStore, accounts: &[String], expected: i64) {
    let mut total = 0;
    let mut effects = std::collections::HashSet::new();
    for a in accounts.iter().map(String::as_str).chain(["gone"]) {
        let events: Vec<_> = store
            .read(&StreamId::new("account", a).unwrap(), 1)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let mut balance = 0i64;
        for e in &events {
            match sluice_ledger::AccountEvent::decode(&e.envelope).unwrap() {
                sluice_ledger::AccountEvent::Deposited { amount } => balance += amount,
                sluice_ledger::AccountEvent::Withdrawn { amount } => balance -= amount,
                _ => {}
            }
            assert!(balance >= 0, "{a} went negative at {}", e.position);
            if let Some(key) = &e.envelope.causation_id {
                assert!(effects.insert(key.clone()), "{key} applied twice");
            }
        }
        total += balance;
    }
    assert_eq!(total, expected);
}

/// Every dead letter: consumer, subject, deliveries and reason.
async fn dead_letters(store: &EventStore) -> Vec<String> {
    sluice_workers::dlq::list(store, &sluice_workers::dlq::Filter::default())
        .await
        .unwrap()
        .entries
        .iter()
        .map(|d| {
            format!(
                "{} {} after {} deliveries: {}",
                d.consumer, d.subject, d.deliveries, d.reason
            )
        })
        .collect()
}

/// Waits until every transfer `<prefix><i>` is completed or compensated.
async fn wait_all_final(
    store: &EventStore,
    prefix: &str,
    n: usize,
    timeout: Duration,
) -> (usize, usize) {
    let deadline = Instant::now() + timeout;
    let (mut completed, mut compensated) = (0, 0);
    for i in 0..n {
        let id = format!("{prefix}{i}");
        loop {
            let v = transfer_status(store, &id).await.unwrap().unwrap();
            match v.state {
                "completed" => completed += 1,
                "compensated" => compensated += 1,
                _ => {
                    if Instant::now() >= deadline {
                        let log = read_log(store, TRANSFER_SAGA, &id).await.unwrap();
                        let commands: Vec<String> = store
                            .read(&StreamId::new("cmd-account", &v.from).unwrap(), 1)
                            .await
                            .unwrap()
                            .try_filter(|e| {
                                std::future::ready(
                                    e.envelope.correlation_id.as_deref() == Some(id.as_str()),
                                )
                            })
                            .map_ok(|e| format!("{} {}", e.position, e.envelope.id.as_str()))
                            .try_collect()
                            .await
                            .unwrap();
                        panic!(
                            "{id} stuck: {v:?}\nlog: {:?}\ncommands: {commands:?}\ndead letters: {:?}",
                            log.records,
                            dead_letters(store).await
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
            break;
        }
    }
    (completed, compensated)
}

const CHILD_ENV: &str = "SLUICE_TEST_CHILD_SAGA_ROLE";

/// The role of the kill test: 64 lanes, a pin handed over 1.5 s after a
/// replica goes silent (a killed process is replaced quickly), and a retry
/// budget that outlasts the kills.
fn kill_test_role() -> TransferRoleConfig {
    let quick = |mut c: WorkerConfig| {
        c = fast(c);
        c.concurrency = 64;
        c.ack_wait = Duration::from_secs(1);
        c.pin_timeout = Duration::from_millis(1_500);
        c.retry.cap = Duration::from_millis(500);
        // Every kill counts a delivery against the messages the killed
        // process held, handled or not; ten kills must not dead-letter a
        // healthy transition or command.
        c.retry.max_attempts = 100;
        c
    };
    let mut c = role(Duration::from_secs(30));
    c.orchestrator.worker = quick(c.orchestrator.worker);
    c.handler = quick(c.handler);
    c
}

/// The store of the kill test's role: the server keeps its default fsync
/// policy, under which single appends beat group commit.
async fn kill_test_store(url: &str) -> EventStore {
    let mut config = sluice_events::StoreConfig::default();
    config.group_commit.enabled = false;
    EventStore::connect(url, config).await.unwrap()
}

/// Not a test on its own (returns at once without [`CHILD_ENV`]): the saga
/// role in a child process that gets killed with SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_saga_role_process() {
    let Ok(url) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = kill_test_store(&url).await;
    let _ = run_transfer_role(&store, kill_test_role(), CancellationToken::new()).await;
}

/// A small deterministic generator (the same "random" run every time).
fn lcg(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    }
}

/// The issue's kill test at full size: 2,000 concurrent random transfers
/// among 100 accounts, one in ten designed to fail at the credit step (the
/// target is closed), while the process running the orchestrator (and the
/// account command handler) is killed with SIGKILL 10 times at random
/// points. In the end every transfer is completed or compensated (every one
/// to the closed account compensated), money is conserved, no balance was
/// ever negative (checked at every event of every account) and no effect
/// was applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_killed_ten_times_during_2000_transfers_applies_nothing_twice() {
    const ACCOUNTS: usize = 100;
    const DEPOSIT: i64 = 1_000;
    const N: usize = 2_000;
    const WRITERS: usize = 8;
    const KILLS: u64 = 10;
    let nats = NatsServer::start();
    let store = nats.store().await;
    let accounts: Vec<String> = (0..ACCOUNTS).map(|i| format!("acc-{i}")).collect();
    for a in &accounts {
        open(&store, a, "EUR", DEPOSIT).await;
    }
    open(&store, "gone", "EUR", 0).await;
    close(&store, "gone").await;

    // The plan: from, to, amount per transfer; every tenth fails at credit.
    let mut next = lcg(0x6b11);
    let plan: Vec<(String, String, i64)> = (0..N)
        .map(|i| {
            let from = next(ACCOUNTS as u64) as usize;
            let to = if i % 10 == 7 {
                "gone".to_owned()
            } else {
                let to = next(ACCOUNTS as u64 - 1) as usize;
                // Any account but the source.
                accounts[if to >= from { to + 1 } else { to }].clone()
            };
            (accounts[from].clone(), to, 1 + next(200) as i64)
        })
        .collect();
    let plan = Arc::new(plan);
    // Concurrent clients, paced so the transfers span the kills.
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, plan) = (store.clone(), plan.clone());
            tokio::spawn(async move {
                for i in (w..N).step_by(WRITERS) {
                    let (from, to, amount) = &plan[i];
                    start_transfer(&store, Some(&format!("k-{i}")), from, to, *amount)
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        })
        .collect();
    // Completions as they are stored, to see each killed process progress.
    let completions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = {
        let mut feed = store
            .subscribe("events.saga-transfer.>", None)
            .await
            .unwrap();
        let completions = completions.clone();
        tokio::spawn(async move {
            while let Some(Ok(ev)) = futures::StreamExt::next(&mut feed).await {
                if matches!(
                    serde_json::from_slice(&ev.envelope.data),
                    Ok(SagaEvent::StepSucceeded { step: 1, .. })
                ) {
                    completions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
    };
    let mut next = lcg(0x4b111);
    let mut done_between_kills = Vec::new();
    for _ in 0..KILLS {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_saga_role_process", "--nocapture"])
            .env(CHILD_ENV, nats.url())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Past the pin handover (1.5 s) from the previous child, then a
        // random while into its work: mid-handler, mid-append, anywhere.
        tokio::time::sleep(Duration::from_millis(1_700 + next(1_500))).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        done_between_kills.push(completions.load(std::sync::atomic::Ordering::Relaxed));
    }
    for w in writers {
        w.await.unwrap();
    }
    assert!(
        done_between_kills
            .windows(2)
            .filter(|w| w[1] > w[0])
            .count()
            >= 5,
        "the killed processes made little progress: completed after each kill {done_between_kills:?}"
    );
    let role_store = kill_test_store(&nats.url()).await;
    let role = role_task(&role_store, kill_test_role());
    let (completed, compensated) = wait_all_final(&store, "k-", N, Duration::from_secs(60)).await;
    for (i, (_, to, _)) in plan.iter().enumerate() {
        if to == "gone" {
            let v = transfer_status(&store, &format!("k-{i}"))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(v.state, "compensated", "{v:?}");
        }
    }
    assert!(
        completed >= N / 2 && compensated >= N / 10,
        "{completed} completed, {compensated} compensated"
    );
    assert_conserved(&store, &accounts, ACCOUNTS as i64 * DEPOSIT).await;
    assert_eq!(dead_letters(&store).await, Vec::<String>::new());
    eprintln!(
        "completed after each kill: {done_between_kills:?}; in the end {completed} completed, {compensated} compensated"
    );
    counter.abort();
    role.stop().await;
}

/// Appends a command that no handler can decode to `cmd-account/<account>`
/// (what any raw NATS client can do): the account's handler dead-letters it
/// and parks the account behind it.
async fn poison_commands_of(store: &EventStore, account: &str) {
    store
        .append(
            &StreamId::new("cmd-account", account).unwrap(),
            sluice_events::ExpectedVersion::Any,
            vec![sluice_events::NewEvent::new(
                sluice_sagas::COMMAND,
                br#"{"not":"a command"}"#.to_vec(),
            )],
        )
        .await
        .unwrap();
}

/// Discards every dead letter of the account command handler for
/// `account`, oldest first (the last one releases the account).
async fn discard_dead_letters_of(store: &EventStore, account: &str) {
    let listing = sluice_workers::dlq::list(
        store,
        &sluice_workers::dlq::Filter {
            consumer: Some(sluice_ledger::ACCOUNT_COMMANDS.to_owned()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut mine: Vec<_> = listing
        .entries
        .into_iter()
        .filter(|d| d.subject == format!("events.cmd-account.{account}"))
        .collect();
    mine.sort_by_key(|d| d.sequence);
    assert!(!mine.is_empty(), "no dead letters for {account}");
    for d in mine {
        sluice_workers::dlq::discard(store, d.id, "test: the cause is fixed")
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_debit_needs_attention_until_an_operator_retries_it() {
    let nats = NatsServer::start();
    let store = nats.store().await;
    open(&store, "src", "EUR", 100).await;
    open(&store, "dst", "EUR", 0).await;
    // A malformed command parks `src` in the account command handler: the
    // transfer's debit is dead-lettered behind it (kind `parked`).
    poison_commands_of(&store, "src").await;
    let role = role_task(&store, role(Duration::from_secs(30)));
    start_transfer(&store, Some("t-dl"), "src", "dst", 60)
        .await
        .unwrap();
    let reason = wait_state(&store, "t-dl", "needs_attention", Duration::from_secs(20)).await;
    assert!(
        reason.contains("t-dl/debit/1 was dead-lettered by ledger-account-commands"),
        "{reason}"
    );
    assert_eq!(balance(&store, "src").await, 100, "nothing was debited");
    let listed = sluice_ledger::list_transfers(&store, Some(TransferState::NeedsAttention))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);

    // A retry while the cause persists: the next attempt is dead-lettered
    // too, and the saga says so (nothing half-done, nothing silent).
    let v = sluice_ledger::retry_transfer(&store, "t-dl", "ops: first try")
        .await
        .unwrap();
    assert_eq!(v.state, "pending");
    wait_for(
        "the second attempt to fail",
        Duration::from_secs(20),
        async || {
            transfer_status(&store, "t-dl")
                .await
                .unwrap()
                .and_then(|v| v.reason)
                .is_some_and(|r| r.contains("t-dl/debit/2 was dead-lettered"))
        },
    )
    .await;
    wait_state(&store, "t-dl", "needs_attention", Duration::from_secs(5)).await;

    // The operator fixes the cause (discards the poison and what is parked
    // behind it), then retries: attempt 3 debits and credits, once.
    discard_dead_letters_of(&store, "src").await;
    sluice_ledger::retry_transfer(&store, "t-dl", "ops: poison discarded")
        .await
        .unwrap();
    wait_state(&store, "t-dl", "completed", Duration::from_secs(20)).await;
    assert_eq!(balance(&store, "src").await, 40);
    assert_eq!(balance(&store, "dst").await, 60);
    let withdrawn = types(&store, "account", "src")
        .await
        .into_iter()
        .filter(|t| t == WITHDRAWN)
        .count();
    assert_eq!(withdrawn, 1, "the debit applied once over three attempts");
    let events = saga_events(&store, "t-dl").await;
    let retries = events
        .iter()
        .filter(|e| matches!(e, SagaEvent::Retried { .. }))
        .count();
    assert_eq!(retries, 2, "{events:?}");

    // Refused where they make no sense: a completed transfer, an unknown id.
    use sluice_sagas::{OperatorAction, Outcome};
    for action in [
        OperatorAction::Retry,
        OperatorAction::Resolve(Outcome::Compensated),
        OperatorAction::Abandon,
    ] {
        let e = sluice_ledger::operate_transfer(&store, "t-dl", action, "again")
            .await
            .unwrap_err();
        assert!(e.is_wrong_state(), "{e}");
        assert!(e.to_string().contains("is completed"), "{e}");
        let e = sluice_ledger::operate_transfer(&store, "nope", action, "x")
            .await
            .unwrap_err();
        assert!(e.is_unknown_instance(), "{e}");
    }
    assert_eq!(
        balance(&store, "src").await + balance(&store, "dst").await,
        100
    );
    role.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overall_deadline_compensates_an_unclaimed_step_and_asks_for_help_for_a_claimed_one() {
    let nats = NatsServer::start();
    let store = nats.store().await;
    for a in ["a1", "a2", "a3"] {
        open(&store, a, "EUR", 100).await;
    }
    open(&store, "b", "EUR", 0).await;
    // Step deadlines far away; the saga's own deadline short. Only the
    // orchestrator runs: no command is handled yet.
    let mut config = role(Duration::from_secs(60));
    config.saga_deadline = Duration::from_secs(2);
    let orchestrator = orchestrator_task(&store, config);
    for (id, from) in [("t-open", "a1"), ("t-resolve", "a2"), ("t-abandon", "a3")] {
        start_transfer(&store, Some(id), from, "b", 50)
            .await
            .unwrap();
    }
    // A handler claimed the debits of two of them and went silent: their
    // outcome is unknown.
    for id in ["t-resolve", "t-abandon"] {
        let claimed = sluice_sagas::append_guarded(&store, TRANSFER_SAGA, id, |_| {
            Ok((
                SagaEvent::StepClaimed {
                    step: 0,
                    attempt: 1,
                },
                format!("{id}/debit/1/claim"),
            ))
        })
        .await
        .unwrap();
        assert!(matches!(claimed, sluice_sagas::Guarded::Appended(_)));
    }
    let reason = wait_state(&store, "t-open", "compensated", Duration::from_secs(20)).await;
    assert!(
        reason.contains("saga deadline of 2s passed during step debit"),
        "{reason}"
    );
    for id in ["t-resolve", "t-abandon"] {
        let reason = wait_state(&store, id, "needs_attention", Duration::from_secs(20)).await;
        assert!(
            reason.contains("claimed by its handler and unanswered"),
            "{id}: {reason}"
        );
    }
    // A pending transfer is not the operator's to end.
    let e = sluice_ledger::operate_transfer(
        &store,
        "t-open",
        sluice_sagas::OperatorAction::Abandon,
        "x",
    )
    .await
    .unwrap_err();
    assert!(e.is_wrong_state(), "{e}");

    // The operator checked the accounts: nothing moved.
    let v = sluice_ledger::operate_transfer(
        &store,
        "t-resolve",
        sluice_sagas::OperatorAction::Resolve(sluice_sagas::Outcome::Compensated),
        "ops: a2 was never debited",
    )
    .await
    .unwrap();
    assert_eq!(v.state, "compensated");
    assert!(v.reason.unwrap().contains("ops: a2 was never debited"));
    let v = sluice_ledger::operate_transfer(
        &store,
        "t-abandon",
        sluice_sagas::OperatorAction::Abandon,
        "ops: settled by hand",
    )
    .await
    .unwrap();
    assert_eq!(v.state, "abandoned");
    // Each action is a transition of its own, with its note.
    let (_, transitions) = sluice_ledger::transfer_history(&store, "t-abandon")
        .await
        .unwrap()
        .unwrap();
    let last = transitions.last().unwrap();
    assert_eq!(last.event_type, sluice_sagas::ABANDONED);
    assert!(
        last.cause.contains("ops: settled by hand"),
        "{}",
        last.cause
    );
    assert!(
        transitions
            .iter()
            .any(|t| t.event_type == sluice_sagas::DEADLINE_PASSED)
    );

    // The handler comes back: the timed-out debit is refused, the claimed
    // ones of the resolved and abandoned transfers apply nothing.
    let handler = handler_task(
        &store,
        fast(WorkerConfig::new(sluice_ledger::ACCOUNT_COMMANDS)),
    );
    wait_for(
        "every debit command handled",
        Duration::from_secs(20),
        async || {
            let info = store
                .jetstream()
                .get_stream("EVENTS")
                .await
                .unwrap()
                .consumer_info(sluice_ledger::ACCOUNT_COMMANDS)
                .await;
            info.is_ok_and(|i| i.num_pending == 0 && i.num_ack_pending == 0)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for a in ["a1", "a2", "a3"] {
        assert_eq!(balance(&store, a).await, 100, "{a}");
    }
    assert_eq!(balance(&store, "b").await, 0);
    assert!(dead_letters(&store).await.is_empty());
    for r in [orchestrator, handler] {
        r.stop().await;
    }
}
