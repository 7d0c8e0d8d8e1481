//! The worker runtime: durable pull consumers, per-aggregate lanes, acks,
//! delayed retries, dead letters and parking.
//!
//! Shape of a running worker (one process, one replica):
//!
//! ```text
//! EVENTS ──► consumer <name>[-p<i>-of-<P>] ─┐  (pinned client: one replica
//! DLQ_REDRIVE ─► consumer <name>-redrive ───┤   per consumer at a time)
//!                                           ▼
//!                      route by hash(subject) to one of `concurrency` lanes
//!                                           ▼
//!        lane: per subject, strictly in stream order; a subject waiting for a
//!        delayed retry holds its later messages (with in-progress acks);
//!        other subjects of the lane keep flowing
//! ```

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use futures::{FutureExt, StreamExt};
use sluice_events::{EVENTS_STREAM, Envelope, EventStore, StreamId, Voided};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{LateRedelivery, WorkerConfig, designates, redrive_consumer_name};
use crate::dlq::{self, Kind, NewDeadLetter};
use crate::error::Error;
use crate::handler::{Delivery, Handler, HandlerError};
use crate::infra::{
    self, PIN_GROUP, REDRIVE_PREFIX, REDRIVE_STREAM, TERM_MARKER, headers as h, lane_of,
    partition_of,
};
use crate::lane::{Arrival, LaneState, Queued, Step};
use crate::park::Parks;
use crate::policy::{Action, Outcome, decide, jitter_unit};

fn consumer_config(
    config: &WorkerConfig,
    name: String,
    filters: Vec<String>,
    description: String,
) -> consumer::pull::Config {
    let (filter_subject, filter_subjects) = if filters.len() == 1 {
        (filters[0].clone(), Vec::new())
    } else {
        (String::new(), filters)
    };
    consumer::pull::Config {
        durable_name: Some(name.clone()),
        name: Some(name),
        description: Some(description),
        deliver_policy: consumer::DeliverPolicy::All,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        // The runtime dead-letters at `max_attempts` itself (and before
        // running a handler again when a delivery had no outcome); the
        // server's limit is the safety net that raises MAX_DELIVERIES.
        max_deliver: i64::from(config.retry.max_attempts) + 2,
        filter_subject,
        filter_subjects,
        max_ack_pending: config.max_ack_pending,
        priority_policy: consumer::PriorityPolicy::PinnedClient,
        priority_groups: vec![PIN_GROUP.to_owned()],
        priority_timeout: config.pin_timeout,
        ..Default::default()
    }
}

/// Creates (or updates) the worker's durable consumers and the streams and
/// bucket it uses. [`run`] calls it; tools may call it to set up ahead.
pub async fn ensure_consumers(
    store: &EventStore,
    config: &WorkerConfig,
) -> Result<Vec<consumer::PullConsumer>, Error> {
    config.validate()?;
    infra::ensure_all(store, config.replicas).await?;
    let events = store
        .stream_named(EVENTS_STREAM)
        .await
        .map_err(|e| Error::nats("opening the EVENTS stream", e))?;
    let mut out = Vec::new();
    for (i, name) in config.partition_consumers().into_iter().enumerate() {
        let mut c = consumer_config(
            config,
            name.clone(),
            config.filter_subjects.clone(),
            format!(
                "Sluice worker {} partition {i} of {}",
                config.name, config.partitions
            ),
        );
        // An existing consumer keeps its start position (the server refuses
        // to change it; `repartition` creates consumers that start mid-log);
        // one that disappeared comes back from its stored position.
        c.deliver_policy = crate::consumers::start_position(store, &events, &name, config.replicas)
            .await?
            .deliver_policy();
        out.push(
            events
                .create_consumer(c)
                .await
                .map_err(|e| Error::nats("creating a worker consumer", e))?,
        );
    }
    let redrive = store
        .stream_named(REDRIVE_STREAM)
        .await
        .map_err(|e| Error::nats("opening the redrive stream", e))?;
    let c = consumer_config(
        config,
        redrive_consumer_name(config.name),
        vec![format!("{REDRIVE_PREFIX}.{}", config.name)],
        format!("Sluice worker {} redriven dead letters", config.name),
    );
    out.push(
        redrive
            .create_consumer(c)
            .await
            .map_err(|e| Error::nats("creating a redrive consumer", e))?,
    );
    Ok(out)
}

/// What [`take_over`] did to one consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenOver {
    /// The durable consumer.
    pub consumer: String,
    /// Messages it had delivered and not seen acknowledged (now redelivered).
    pub in_flight: usize,
    /// The stream sequence delivery restarts at (its ack floor + 1).
    pub from_sequence: u64,
}

/// Takes the worker's consumers (`EVENTS` partitions and redrive) over from
/// a process that is gone: releases the pin of its priority group (nats-server
/// 2.11 unpin) and resets each consumer to its ack floor (2.14 consumer
/// reset). Everything delivered and not acknowledged is then delivered again
/// at once, in stream order and ahead of newer messages, instead of after
/// `pin_timeout` and in the order the ack waits expire.
///
/// Only for a process that is the sole consumer (`sluice up`): a replica that
/// is still running would see its in-flight messages delivered here too.
/// Messages acknowledged above the ack floor are delivered again as well
/// (handlers are idempotent), and the server's delivery counts start over.
pub async fn take_over(store: &EventStore, config: &WorkerConfig) -> Result<Vec<TakenOver>, Error> {
    let mut out = Vec::new();
    let mut names: Vec<(&str, String)> = config
        .partition_consumers()
        .into_iter()
        .map(|n| (EVENTS_STREAM, n))
        .collect();
    names.push((REDRIVE_STREAM, redrive_consumer_name(config.name)));
    for (stream_name, name) in names {
        let stream = store
            .stream_named(stream_name)
            .await
            .map_err(|e| Error::nats("opening a stream to take its consumer over", e))?;
        let before = stream
            .consumer_info(&name)
            .await
            .map_err(|e| Error::nats("reading a consumer to take it over", e))?;
        stream
            .unpin_consumer(&name, PIN_GROUP)
            .await
            .map_err(|e| Error::nats("releasing the pin of a dead consumer", e))?;
        let reset = stream
            .reset_consumer(&name, None)
            .await
            .map_err(|e| Error::nats("resetting a consumer to its ack floor", e))?;
        let taken = TakenOver {
            consumer: name,
            in_flight: before.num_ack_pending,
            from_sequence: reset.reset_seq,
        };
        tracing::info!(worker = config.name, consumer = %taken.consumer, in_flight = taken.in_flight, from_sequence = taken.from_sequence, "took the consumer over: unacknowledged messages are redelivered now, in order");
        out.push(taken);
    }
    Ok(out)
}

/// Where a message came from.
#[derive(Debug, Clone, Copy)]
enum Source {
    Live,
    Redrive { dlq_id: u64, last: bool },
}

/// One message routed to a lane.
struct Incoming {
    msg: jetstream::Message,
    /// The original event's subject (for a redrive: from its headers).
    subject: String,
    /// The original event's stream sequence.
    seq: u64,
    /// The server's delivery count of this message.
    delivered: u64,
    source: Source,
}

struct Ctx<H> {
    store: EventStore,
    config: WorkerConfig,
    handler: H,
    parks: Parks,
    /// Voided events: skipped, never handed to the handler.
    voided: Voided,
}

/// Runs a worker until `cancel` fires, then stops fetching, lets handlers in
/// flight finish and ack, hands unstarted messages back, and returns.
///
/// Delivery is at least once: the handler must be idempotent (keyed by the
/// event id or [`Delivery::sequence`]).
pub async fn run<H: Handler>(
    store: &EventStore,
    config: WorkerConfig,
    handler: H,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let store = store.clone();
    let consumers = ensure_consumers(&store, &config).await?;
    if config.take_over_on_start {
        // An optimisation of the restart, not a condition of correctness
        // (late redeliveries are handled either way): a server without the
        // unpin or reset API (before 2.11 / 2.14) or a user without the
        // permission only makes the restart slower.
        if let Err(e) = take_over(&store, &config).await {
            tracing::warn!(worker = config.name, error = %e, "could not take the consumers over at start (consumer unpin needs nats-server 2.11+, reset 2.14+); in-flight messages come back after the pin timeout and ack wait instead");
        }
    }
    let kv = infra::ensure_parked_bucket(&store, config.replicas).await?;
    // The watch task outlives `run` by at most this token.
    let background = cancel.child_token();
    let parks = Parks::cached(kv, config.name, background.clone()).await?;
    tokio::spawn(crate::consumers::track_positions(
        store.clone(),
        config.partition_consumers(),
        background.clone(),
    ));
    let voided = store
        .voided()
        .await
        .map_err(|e| Error::nats("loading the voided events", e))?;
    tokio::spawn(crate::voids::release_voided(
        store.clone(),
        config.name,
        voided.clone(),
        background.clone(),
    ));
    let ctx = Arc::new(Ctx {
        store: store.clone(),
        config: config.clone(),
        handler,
        parks,
        voided,
    });

    // Every task lives in a JoinSet, and the background token is cancelled
    // on drop: aborting `run` (a killed worker) stops everything at once.
    let _stop_background = background.clone().drop_guard();
    let mut lanes = Vec::with_capacity(config.concurrency);
    let mut lane_tasks = tokio::task::JoinSet::new();
    for lane in 0..config.concurrency {
        let (tx, rx) = mpsc::channel(config.batch.max(16));
        lanes.push(tx);
        lane_tasks.spawn(run_lane(ctx.clone(), lane, rx, cancel.clone()));
    }
    let partitions = config.partitions;
    let mut pullers = tokio::task::JoinSet::new();
    let redrive_index = consumers.len() - 1;
    for (i, consumer) in consumers.into_iter().enumerate() {
        let kind = if i == redrive_index {
            PullKind::Redrive
        } else {
            PullKind::Live {
                partition: i as u16,
                partitions,
            }
        };
        pullers.spawn(pull_loop(
            ctx.clone(),
            consumer,
            kind,
            lanes.clone(),
            cancel.clone(),
        ));
    }
    drop(lanes);
    let mut advisory = tokio::task::JoinSet::new();
    if config.capture_advisories {
        advisory.spawn(crate::advisory::capture(
            store.clone(),
            config.clone(),
            ctx.parks.clone(),
            cancel.clone(),
        ));
    }
    tracing::info!(
        worker = config.name,
        partitions,
        concurrency = config.concurrency,
        "worker started"
    );

    cancel.cancelled().await;
    pullers.join_all().await;
    // Pullers are gone, so every lane's channel closes once drained.
    lane_tasks.join_all().await;
    advisory.join_all().await;
    background.cancel();
    // Acks are fire-and-forget publishes: push them out before returning.
    if let Err(e) = ctx.store.flush().await {
        tracing::warn!(worker = config.name, error = %e, "flush on shutdown failed");
    }
    tracing::info!(worker = config.name, "worker stopped");
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum PullKind {
    Live { partition: u16, partitions: u16 },
    Redrive,
}

async fn pull_loop<H: Handler>(
    ctx: Arc<Ctx<H>>,
    consumer: consumer::PullConsumer,
    kind: PullKind,
    lanes: Vec<mpsc::Sender<Incoming>>,
    cancel: CancellationToken,
) {
    let name = ctx.config.name;
    // Pulls expire well within the pin timeout, so an idle but healthy
    // replica renews its pin.
    let expires = (ctx.config.pin_timeout / 4).min(Duration::from_secs(30));
    let heartbeat = (expires / 4).max(Duration::from_millis(100));
    'outer: loop {
        let stream = consumer
            .stream()
            .group(PIN_GROUP)
            .max_messages_per_batch(ctx.config.batch)
            .expires(expires)
            .heartbeat(heartbeat)
            .messages()
            .await;
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(worker = name, error = %e, "cannot start pulling; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => break 'outer,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'outer,
                }
            }
        };
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => break 'outer,
                next = stream.next() => next,
            };
            let msg = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::debug!(worker = name, error = %e, "pull stream error");
                    continue;
                }
                None => continue 'outer,
            };
            let msg = match kind {
                PullKind::Redrive => match resolve_redriven(&ctx.store, msg).await {
                    Some(m) => m,
                    None => continue,
                },
                PullKind::Live { .. } => msg,
            };
            let incoming = match route(msg, kind) {
                Routed::Ours(incoming) => incoming,
                Routed::NotOurs(msg) => {
                    if let PullKind::Live { .. } = kind {
                        // Another partition's message: not ours to handle.
                        if let Err(e) = msg.ack().await {
                            tracing::warn!(worker = name, error = %e, "ack of a foreign-partition message failed");
                        }
                    } else {
                        let reason = "redriven message without Sluice-Dlq-Subject/Sequence headers";
                        tracing::error!(worker = name, "{reason}; terminating it");
                        term(&ctx.store, &msg, reason).await;
                    }
                    continue;
                }
            };
            let lane = lane_of(&incoming.subject, lanes.len());
            let sent = lanes[lane].send(incoming).await;
            if sent.is_err() {
                break 'outer;
            }
        }
    }
}

/// A redriven by-reference dead letter carries no body: put the original's
/// (read from the log) in. `None` when it cannot be read now (the message
/// is handed back for a later try).
async fn resolve_redriven(
    store: &EventStore,
    mut msg: jetstream::Message,
) -> Option<jetstream::Message> {
    let Some(headers) = msg.headers.as_ref() else {
        return Some(msg);
    };
    match dlq::resolve_reference(store, headers).await {
        Ok(None) => Some(msg),
        Ok(Some((headers, payload))) => {
            msg.message.headers = Some(headers);
            msg.message.payload = payload;
            Some(msg)
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read the original of a redriven by-reference dead letter; retrying it");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                .await;
            None
        }
    }
}

/// Where a pulled message belongs.
enum Routed {
    /// Ours: route it to its lane.
    Ours(Incoming),
    /// A live message of another partition, or a redriven message without
    /// our headers.
    NotOurs(jetstream::Message),
}

/// Reads where a message belongs.
fn route(msg: jetstream::Message, kind: PullKind) -> Routed {
    let Ok(info) = msg.info() else {
        return Routed::NotOurs(msg);
    };
    let delivered = u64::try_from(info.delivered).unwrap_or(1).max(1);
    let seq = info.stream_sequence;
    match kind {
        PullKind::Live {
            partition,
            partitions,
        } => {
            let subject = msg.subject.to_string();
            if partitions > 1 && partition_of(&subject, partitions) != partition {
                return Routed::NotOurs(msg);
            }
            Routed::Ours(Incoming {
                seq,
                msg,
                subject,
                delivered,
                source: Source::Live,
            })
        }
        PullKind::Redrive => {
            let read = |msg: &jetstream::Message| {
                let headers = msg.headers.as_ref()?;
                let subject = headers.get(h::SUBJECT)?.as_str().to_owned();
                let seq: u64 = headers.get(h::SEQUENCE)?.as_str().parse().ok()?;
                let dlq_id = headers
                    .get(h::REDRIVE_OF)
                    .and_then(|v| v.as_str().parse().ok())
                    .unwrap_or(0);
                let last = headers.get(h::REDRIVE_LAST).is_some();
                Some((subject, seq, dlq_id, last))
            };
            match read(&msg) {
                Some((subject, seq, dlq_id, last)) => Routed::Ours(Incoming {
                    msg,
                    subject,
                    seq,
                    delivered,
                    source: Source::Redrive { dlq_id, last },
                }),
                None => Routed::NotOurs(msg),
            }
        }
    }
}

async fn arrive<H: Handler>(ctx: &Ctx<H>, state: &mut LaneState<Incoming>, m: Incoming) {
    match state.enqueue(m) {
        Arrival::Queued => {}
        Arrival::Duplicate(m) => ack_stale(&m).await,
        Arrival::Late(m) => late(ctx, &m).await,
        Arrival::QueuedLate { subject, seq } => {
            metrics::counter!("sluice_late_redeliveries_total", "worker" => ctx.config.name)
                .increment(1);
            tracing::warn!(worker = ctx.config.name, subject = %subject, seq, "late redelivery (an earlier owner received it and never acknowledged it; a later event of the aggregate was handled since): handing it to the idempotent handler");
        }
    }
}

async fn run_lane<H: Handler>(
    ctx: Arc<Ctx<H>>,
    lane: usize,
    mut rx: mpsc::Receiver<Incoming>,
    cancel: CancellationToken,
) {
    let worker = ctx.config.name;
    let mut state: LaneState<Incoming> = LaneState::new(
        ctx.config.redelivery_settle,
        ctx.config.late_redelivery == LateRedelivery::Handle,
    );
    let mut tick = tokio::time::interval(ctx.config.ack_wait / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = true;
    while !cancel.is_cancelled() {
        let (next, wake) = state.next_runnable();
        if let Some(m) = next {
            let subject = m.subject.clone();
            let seq = m.seq;
            let live = matches!(m.source, Source::Live);
            let reply = m.msg.reply.clone();
            let work = process(&ctx, m);
            tokio::pin!(work);
            // While the handler runs, keep receiving (other subjects queue
            // up) and keep every held message and the running one alive.
            let step = loop {
                tokio::select! {
                    step = &mut work => break step,
                    _ = tick.tick() => {
                        if let Some(r) = &reply {
                            progress(&ctx.store, r).await;
                        }
                        keep_alive(&ctx.store, &state).await;
                    }
                    m = rx.recv(), if open => match m {
                        Some(m) => arrive(&ctx, &mut state, m).await,
                        None => open = false,
                    },
                }
            };
            state.finished(&subject, seq, live, step, ctx.config.ack_wait);
            continue;
        }
        if !open {
            break;
        }
        let wake = wake.unwrap_or_else(|| Instant::now() + ctx.config.ack_wait);
        tokio::select! {
            _ = cancel.cancelled() => {}
            m = rx.recv() => match m {
                Some(m) => arrive(&ctx, &mut state, m).await,
                None => open = false,
            },
            _ = tokio::time::sleep_until(wake) => {}
            _ = tick.tick() => {
                keep_alive(&ctx.store, &state).await;
                state.expire_waits(worker);
            }
        }
    }
    // Shutdown: take in what the pullers still send (they stop at once),
    // then hand back unstarted messages of subjects not waiting for a
    // delayed retry, in order, so they are redelivered at once. Held
    // messages stay unacked: they must not overtake their delayed head.
    while open {
        match rx.recv().await {
            Some(m) => arrive(&ctx, &mut state, m).await,
            None => open = false,
        }
    }
    let mut handed_back = 0usize;
    for m in state.handback() {
        if m.msg.ack_with(AckKind::Nak(None)).await.is_ok() {
            handed_back += 1;
        }
    }
    tracing::debug!(worker, lane, handed_back, "lane stopped");
}

/// An earlier event arrived after a later event of the same aggregate was
/// handled: it cannot be applied in order any more. Dead-letter it (and park
/// the aggregate) so an operator decides, rather than drop or misapply it.
async fn late<H: Handler>(ctx: &Ctx<H>, m: &Incoming) {
    let reason = format!(
        "redelivered after a later event of the same aggregate was handled (out-of-order redelivery of stream sequence {}); redrive to apply it late, or discard",
        m.seq
    );
    let result = async {
        dlq::write(
            &ctx.store,
            NewDeadLetter {
                consumer: ctx.config.name,
                subject: &m.subject,
                stream: EVENTS_STREAM,
                sequence: m.seq,
                deliveries: m.delivered,
                reason: &reason,
                kind: Kind::Late,
                headers: m.msg.headers.as_ref(),
                payload: m.msg.payload.clone(),
                parked_behind: None,
                redrive_of: None,
            },
        )
        .await?;
        if let Ok(stream_id) = StreamId::from_subject("events", &m.subject) {
            ctx.parks.park_head(&stream_id, m.seq).await?;
        }
        Ok::<(), Error>(())
    }
    .await;
    match result {
        Ok(()) => term(&ctx.store, &m.msg, &reason).await,
        Err(e) => {
            tracing::error!(worker = ctx.config.name, subject = %m.subject, seq = m.seq, error = %e, "could not dead-letter a late event; it will be redelivered");
        }
    }
}

async fn ack_stale(m: &Incoming) {
    tracing::debug!(subject = %m.subject, seq = m.seq, "stale redelivery of a handled message; acking");
    let _ = m.msg.ack().await;
}

async fn progress(store: &EventStore, reply: &async_nats::Subject) {
    let _ = store.publish_reply(reply.clone(), "+WPI".into()).await;
}

async fn keep_alive(store: &EventStore, state: &LaneState<Incoming>) {
    for m in state.queued() {
        if let Some(r) = &m.msg.reply {
            progress(store, r).await;
        }
    }
}

impl Queued for Incoming {
    fn subject(&self) -> &str {
        &self.subject
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn delivered(&self) -> u64 {
        self.delivered
    }
    fn is_live(&self) -> bool {
        matches!(self.source, Source::Live)
    }
}

/// `+TERM <reason>`: the server stops redelivering and puts the reason in
/// its MSG_TERMINATED advisory. The client has no reason-carrying Term, so
/// the ack payload is sent by hand.
async fn term(store: &EventStore, msg: &jetstream::Message, reason: &str) {
    if let Some(reply) = &msg.reply {
        let short: String = reason
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        let payload = format!("+TERM {TERM_MARKER}: {short}");
        if let Err(e) = store.publish_reply(reply.clone(), payload.into()).await {
            tracing::warn!(error = %e, "term failed; the message will be redelivered and dead-lettered again (deduplicated)");
        }
    }
}

/// Handles one message end to end and says what its lane should do next.
async fn process<H: Handler>(ctx: &Ctx<H>, m: Incoming) -> Step {
    match process_inner(ctx, &m).await {
        Ok(step) => {
            crate::health::progressed(ctx.config.name, &m.subject);
            step
        }
        Err(e) if e.is_cannot_dead_letter() => {
            // Never silently: the aggregate stops here (nothing after it is
            // handled, nothing is dropped), readiness and the halted gauge
            // say so, and the message is retried until the DLQ takes it.
            let delay = ctx.config.retry.delay(m.delivered, jitter_unit());
            tracing::error!(worker = ctx.config.name, subject = %m.subject, seq = m.seq, error = %e, retry_in = ?delay, "worker halted on an aggregate: its dead letter cannot be stored");
            crate::health::halted(ctx.config.name, &m.subject, m.seq, e.to_string());
            let _ = m.msg.ack_with(AckKind::Nak(Some(delay))).await;
            Step::Retrying(delay)
        }
        Err(e) => {
            // The DLQ or the parked bucket could not be written: retry the
            // whole message later rather than lose or reorder it.
            let delay = ctx.config.retry.delay(m.delivered, jitter_unit());
            tracing::error!(worker = ctx.config.name, subject = %m.subject, seq = m.seq, error = %e, retry_in = ?delay, "could not record the outcome; retrying the message");
            let _ = m.msg.ack_with(AckKind::Nak(Some(delay))).await;
            Step::Retrying(delay)
        }
    }
}

/// One delivery: [`classify`] it, [`handle`] it when it is a normal one,
/// [`settle`] it. An error is an outcome that could not be recorded (the
/// DLQ, the parked bucket or the ack failed): [`process`] retries it.
async fn process_inner<H: Handler>(ctx: &Ctx<H>, m: &Incoming) -> Result<Step, Error> {
    let settlement = match classify(ctx, m).await? {
        Class::BadSubject { reason } => Settlement::DeadLetter {
            reason,
            kind: Kind::Decode,
            parked_behind: None,
            park: None,
        },
        Class::Voided { stream_id } => Settlement::Ack {
            stream_id,
            outcome: "voided",
        },
        Class::Parked { reason, behind } => Settlement::DeadLetter {
            reason,
            kind: Kind::Parked,
            parked_behind: behind,
            park: None,
        },
        Class::Poison {
            stream_id,
            reason,
            kind,
        } => Settlement::DeadLetter {
            reason,
            kind,
            parked_behind: None,
            park: Some(stream_id),
        },
        Class::Normal {
            stream_id,
            envelope,
        } => handle(ctx, m, stream_id, envelope).await,
    };
    settle(ctx, m, settlement).await
}

/// What a delivery is, decided before any handler runs.
enum Class {
    /// Its subject names no aggregate: dead-lettered as undecodable, with
    /// no aggregate to park.
    BadSubject { reason: String },
    /// Voided by an operator: done without running the handler.
    Voided { stream_id: StreamId },
    /// A live event of a parked aggregate: dead-lettered behind the head
    /// (`behind` is `None` for a redelivery of the head itself).
    Parked { reason: String, behind: Option<u64> },
    /// Poison: it cannot be handled (delivered past the attempt limit
    /// without an outcome, or an envelope that does not decode), so it is
    /// dead-lettered as the head of its aggregate.
    Poison {
        stream_id: StreamId,
        reason: String,
        kind: Kind,
    },
    /// A normal delivery, for the handler.
    Normal {
        stream_id: StreamId,
        envelope: Envelope,
    },
}

/// How a delivery ends: the input of [`settle`].
enum Settlement {
    /// Done: acked (a redriven event first releases its aggregate);
    /// `outcome` labels the metric.
    Ack {
        stream_id: StreamId,
        outcome: &'static str,
    },
    /// A transient failure: handed back with this delay.
    Retry(Duration),
    /// Copied to the DLQ (awaited) with `parked_behind`, its aggregate
    /// parked at it when `park` names one, then terminated.
    DeadLetter {
        reason: String,
        kind: Kind,
        parked_behind: Option<u64>,
        park: Option<StreamId>,
    },
}

/// Decides what the delivery is. The only write is the parked set's
/// compare-and-set when a live event goes behind its aggregate's head.
async fn classify<H: Handler>(ctx: &Ctx<H>, m: &Incoming) -> Result<Class, Error> {
    let cfg = &ctx.config;
    let stream_id = match StreamId::from_subject("events", &m.subject) {
        Ok(s) => s,
        Err(e) => {
            return Ok(Class::BadSubject {
                reason: dlq::decode_reason(&e),
            });
        }
    };

    // A voided event is not handled: acked as done (a redriven one releases
    // its aggregate, as a handled redrive does).
    if ctx.voided.contains(m.seq) {
        tracing::info!(worker = cfg.name, subject = %m.subject, seq = m.seq, "voided event skipped");
        return Ok(Class::Voided { stream_id });
    }

    // Sequence-aware dead-lettering: a live event of a parked aggregate goes
    // behind its head instead of being applied out of order.
    if let Source::Live = m.source
        && ctx.parks.maybe_parked(&stream_id).await?
        && let Some(head) = ctx.parks.park_behind(&stream_id, m.seq).await?
    {
        let reason = if head == m.seq {
            format!("dead-lettered earlier (redelivered head of parked aggregate {stream_id})")
        } else {
            format!(
                "parked behind sequence {head}: an earlier event of {stream_id} is dead-lettered for consumer {}",
                cfg.name
            )
        };
        return Ok(Class::Parked {
            reason,
            behind: (head != m.seq).then_some(head),
        });
    }

    let max = u64::from(cfg.retry.max_attempts);
    if m.delivered > max {
        // The previous delivery had no outcome: the worker crashed or hung
        // on it. Running it again could crash again; dead-letter it.
        let reason = format!(
            "delivered {} times without an outcome (limit {max} attempts): the worker crashed, hung or lost its connection while handling it",
            m.delivered
        );
        return Ok(Class::Poison {
            stream_id,
            reason,
            kind: Kind::Exhausted,
        });
    }

    match Envelope::decode(m.msg.headers.as_ref(), &m.msg.payload, cfg.max_payload) {
        Ok(envelope) => Ok(Class::Normal {
            stream_id,
            envelope,
        }),
        Err(e) => Ok(Class::Poison {
            stream_id,
            reason: dlq::decode_reason(&e),
            kind: Kind::Decode,
        }),
    }
}

/// Runs the handler on a normal delivery (with its timeout, a panic caught
/// as a permanent failure) and decides by the retry policy how it settles.
async fn handle<H: Handler>(
    ctx: &Ctx<H>,
    m: &Incoming,
    stream_id: StreamId,
    envelope: Envelope,
) -> Settlement {
    let cfg = &ctx.config;
    // The handler's span continues the trace that appended the event, so
    // whatever it appends (commands, replies) continues it too.
    let span = tracing::info_span!(
        "worker.handle",
        worker = cfg.name,
        subject = %m.subject,
        seq = m.seq,
        attempt = m.delivered,
        event_type = %envelope.event_type,
    );
    sluice_events::trace::set_parent(&span, envelope.traceparent.as_deref());
    let delivery = Delivery {
        stream_id: stream_id.clone(),
        sequence: m.seq,
        envelope,
        attempt: m.delivered,
        redriven: matches!(m.source, Source::Redrive { .. }),
    };
    let handled = tokio::time::timeout(
        cfg.handler_timeout,
        AssertUnwindSafe(ctx.handler.handle(delivery).instrument(span)).catch_unwind(),
    )
    .await;
    let (outcome, kind) = match handled {
        Ok(Ok(Ok(()))) => (Outcome::Ok, Kind::Handler),
        Ok(Ok(Err(HandlerError::Transient(e)))) => {
            (Outcome::Transient(e.to_string()), Kind::Exhausted)
        }
        Ok(Ok(Err(HandlerError::Permanent(e)))) => {
            (Outcome::Permanent(format!("handler: {e}")), Kind::Handler)
        }
        Ok(Err(panic)) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-text panic payload".to_owned());
            (
                Outcome::Permanent(format!("handler panicked: {text}")),
                Kind::Panic,
            )
        }
        Err(_) => (
            Outcome::Transient(format!("handler timed out after {:?}", cfg.handler_timeout)),
            Kind::Exhausted,
        ),
    };
    match decide(&outcome, m.delivered, &cfg.retry, jitter_unit()) {
        Action::Ack => Settlement::Ack {
            stream_id,
            outcome: "ok",
        },
        Action::Retry(delay) => {
            metrics::counter!("sluice_handler_outcomes_total", "worker" => cfg.name, "outcome" => "retry").increment(1);
            tracing::info!(worker = cfg.name, subject = %m.subject, seq = m.seq, attempt = m.delivered, retry_in = ?delay, "transient failure; retrying");
            Settlement::Retry(delay)
        }
        Action::DeadLetter(reason) => {
            metrics::counter!("sluice_handler_outcomes_total", "worker" => cfg.name, "outcome" => "dead_letter").increment(1);
            Settlement::DeadLetter {
                reason,
                kind,
                parked_behind: None,
                park: Some(stream_id),
            }
        }
    }
}

/// Carries a settlement out: ack, nak with the retry delay, or the dead
/// letter (awaited), the parking, then `+TERM`.
async fn settle<H: Handler>(
    ctx: &Ctx<H>,
    m: &Incoming,
    settlement: Settlement,
) -> Result<Step, Error> {
    match settlement {
        Settlement::Ack { stream_id, outcome } => acked(ctx, m, &stream_id, outcome).await,
        Settlement::Retry(delay) => {
            m.msg
                .ack_with(AckKind::Nak(Some(delay)))
                .await
                .map_err(|e| Error::nats("negatively acknowledging a message", e))?;
            Ok(Step::Retrying(delay))
        }
        Settlement::DeadLetter {
            reason,
            kind,
            parked_behind,
            park,
        } => {
            let redrive_of = match m.source {
                Source::Live => None,
                Source::Redrive { dlq_id, .. } => Some(dlq_id),
            };
            dlq::write(
                &ctx.store,
                NewDeadLetter {
                    consumer: ctx.config.name,
                    subject: &m.subject,
                    stream: EVENTS_STREAM,
                    sequence: m.seq,
                    deliveries: m.delivered,
                    reason: &reason,
                    kind,
                    headers: m.msg.headers.as_ref(),
                    payload: m.msg.payload.clone(),
                    parked_behind,
                    redrive_of,
                },
            )
            .await?;
            if let Some(stream_id) = &park {
                ctx.parks.park_head(stream_id, m.seq).await?;
            }
            term(&ctx.store, &m.msg, &reason).await;
            Ok(Step::Done)
        }
    }
}

/// Acks a message that is done (handled, or voided). A redriven event
/// releases its aggregate before the ack: if the release fails, the
/// redelivery retries it (the handler is idempotent); acking first could
/// leave the aggregate parked.
async fn acked<H: Handler>(
    ctx: &Ctx<H>,
    m: &Incoming,
    stream_id: &StreamId,
    outcome: &'static str,
) -> Result<Step, Error> {
    let cfg = &ctx.config;
    if let Source::Redrive { last, .. } = m.source {
        let released = ctx.parks.release_after(stream_id, m.seq).await?;
        if !released && last {
            // Events of the aggregate were parked while this redrive
            // ran: hand them back too, behind it.
            let store = ctx.store.clone();
            let (consumer, subject) = (cfg.name.to_owned(), m.subject.clone());
            tokio::spawn(async move {
                if let Err(e) = dlq::redrive_aggregate(&store, &consumer, &subject).await {
                    tracing::warn!(consumer = %consumer, subject = %subject, error = %e, "could not continue the redrive of a parked aggregate");
                }
            });
        }
    }
    m.msg
        .ack()
        .await
        .map_err(|e| Error::nats("acknowledging a message", e))?;
    metrics::counter!("sluice_handler_outcomes_total", "worker" => cfg.name, "outcome" => outcome)
        .increment(1);
    Ok(Step::Done)
}

/// What [`repartition`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repartitioned {
    /// Consumers removed.
    pub removed: Vec<String>,
    /// Consumers created.
    pub created: Vec<String>,
    /// Stream sequence the new consumers start at (the lowest old ack floor + 1).
    pub start_sequence: u64,
}

/// Moves worker `config.name` to `config.partitions` partition consumers
/// without losing order. Every replica must be stopped (gracefully) first.
///
/// The new consumers start right after the lowest ack floor of the old ones:
/// everything at or below it was handled by its old partition; events above
/// it may be delivered again (at least once), in stream order per aggregate.
pub async fn repartition(
    store: &EventStore,
    config: &WorkerConfig,
) -> Result<Repartitioned, Error> {
    config.validate()?;
    infra::ensure_all(store, config.replicas).await?;
    let events = store
        .stream_named(EVENTS_STREAM)
        .await
        .map_err(|e| Error::nats("opening the EVENTS stream", e))?;
    let wanted = config.partition_consumers();
    let mut old = Vec::new();
    let mut names = events.consumer_names();
    while let Some(n) = names.next().await {
        let n = n.map_err(|e| Error::nats("listing consumers", e))?;
        let ours = designates(config.name, &n) && n != redrive_consumer_name(config.name);
        if ours && !wanted.contains(&n) {
            old.push(n);
        }
    }
    old.sort();
    let mut floor = u64::MAX;
    for name in &old {
        let info = events
            .consumer_info(name)
            .await
            .map_err(|e| Error::nats("reading consumer info", e))?;
        // A waiting pull request means a replica is still running (or
        // stopped less than a pull expiry ago). Unacked messages are fine:
        // they lie above the floor and are delivered again.
        if info.num_waiting > 0 {
            return Err(Error::InvalidConfig(format!(
                "consumer {name} has {} pull requests waiting: stop every replica of {} before repartitioning (or retry in a few seconds)",
                info.num_waiting, config.name
            )));
        }
        floor = floor.min(info.ack_floor.stream_sequence);
    }
    if old.is_empty() {
        ensure_consumers(store, config).await?;
        return Ok(Repartitioned {
            removed: Vec::new(),
            created: wanted,
            start_sequence: 1,
        });
    }
    let start_sequence = floor + 1;
    for (i, name) in wanted.iter().enumerate() {
        let mut c = consumer_config(
            config,
            name.clone(),
            config.filter_subjects.clone(),
            format!(
                "Sluice worker {} partition {i} of {}",
                config.name, config.partitions
            ),
        );
        c.deliver_policy = consumer::DeliverPolicy::ByStartSequence { start_sequence };
        events
            .create_consumer(c)
            .await
            .map_err(|e| Error::nats("creating a worker consumer", e))?;
    }
    for name in &old {
        events
            .delete_consumer(name)
            .await
            .map_err(|e| Error::nats("deleting an old partition consumer", e))?;
    }
    tracing::warn!(worker = config.name, removed = ?old, created = ?wanted, start_sequence, "repartitioned");
    Ok(Repartitioned {
        removed: old,
        created: wanted,
        start_sequence,
    })
}
