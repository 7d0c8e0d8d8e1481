//! The `EVENTS` stream itself: creating it with the settings the store
//! relies on, its state, and what in it could lose or duplicate events.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::config::StoreConfig;
use crate::error::Error;

/// A snapshot of the stream's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamState {
    /// Events stored.
    pub messages: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// First position.
    pub first_position: u64,
    /// Last position (the head of the log).
    pub last_position: u64,
    /// Replicas configured.
    pub replicas: usize,
    /// Distinct aggregates.
    pub aggregates: u64,
    /// Age limit (zero = none): events older than this are deleted.
    pub max_age: Duration,
    /// Size limit in bytes (-1 = none).
    pub max_bytes: i64,
    /// Message-count limit (-1 = none).
    pub max_messages: i64,
    /// Per-aggregate message limit (-1 or 0 = none).
    pub max_messages_per_subject: i64,
    /// How long the server remembers event ids for dedup.
    pub duplicate_window: Duration,
}

impl StreamState {
    /// Ways the stream could lose or duplicate acknowledged events, for an
    /// operator's status view and the start of a server.
    ///
    /// `sync_always`: whether the server fsyncs every write, when known;
    /// `production`: require replicas >= 3; `retry_horizon`: how long an
    /// append may keep retrying with the same ids.
    pub fn durability_warnings(
        &self,
        sync_always: Option<bool>,
        production: bool,
        retry_horizon: Duration,
    ) -> Vec<String> {
        let mut w = Vec::new();
        match sync_always {
            Some(true) => {}
            Some(false) => w.push(
                "sync_interval is not `always`: acknowledged events can be lost if the machine crashes".to_owned(),
            ),
            None if self.replicas < 3 => w.push(
                "the server's sync_interval is not visible to clients: make sure it is `always` (or run replicas >= 3 across failure domains)".to_owned(),
            ),
            None => {}
        }
        if production && self.replicas < 3 {
            w.push(format!(
                "the event stream has {} replica(s): production needs 3 to survive a node loss",
                self.replicas
            ));
        }
        if !self.max_age.is_zero() {
            w.push(format!(
                "the event stream has max_age {:?}: older events are deleted",
                self.max_age
            ));
        }
        if self.max_bytes > 0 || self.max_messages > 0 {
            w.push("the event stream has a size or message limit: old events are deleted when it is reached".to_owned());
        }
        if self.max_messages_per_subject > 0 {
            w.push(format!(
                "the event stream keeps only {} event(s) per aggregate",
                self.max_messages_per_subject
            ));
        }
        if self.duplicate_window < retry_horizon {
            w.push(format!(
                "the duplicate window ({:?}) is shorter than the append retry horizon ({retry_horizon:?}): a late retry could store an event twice",
                self.duplicate_window
            ));
        }
        w
    }
}

/// Counts, positions and limits of the whole log.
pub(super) async fn state(stream: &stream::Stream) -> Result<StreamState, Error> {
    let mut stream = stream.clone();
    let info = stream.info().await.map_err(Error::StreamInfo)?;
    Ok(StreamState {
        messages: info.state.messages,
        bytes: info.state.bytes,
        first_position: info.state.first_sequence,
        last_position: info.state.last_sequence,
        replicas: info.config.num_replicas,
        aggregates: info.state.subjects_count,
        max_age: info.config.max_age,
        max_bytes: info.config.max_bytes,
        max_messages: info.config.max_messages,
        max_messages_per_subject: info.config.max_messages_per_subject,
        duplicate_window: info.config.duplicate_window,
    })
}

/// The head of the log (its last position).
pub(super) async fn head(stream: &stream::Stream) -> Result<u64, Error> {
    let mut stream = stream.clone();
    let info = stream.info().await.map_err(Error::StreamInfo)?;
    Ok(info.state.last_sequence)
}

/// The stream, created with the settings Sluice relies on, or updated to
/// them where that is safe; refused when its limits would delete events.
pub(super) async fn ensure(
    js: &jetstream::Context,
    cfg: &StoreConfig,
) -> Result<stream::Stream, Error> {
    let wanted = stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![format!("{}.>", cfg.subject_prefix)],
        storage: stream::StorageType::File,
        num_replicas: cfg.replicas,
        duplicate_window: cfg.duplicate_window,
        max_age: Duration::ZERO,
        max_bytes: -1,
        max_messages: -1,
        max_messages_per_subject: -1,
        discard: stream::DiscardPolicy::Old,
        allow_direct: true,
        allow_atomic_publish: true,
        deny_delete: true,
        deny_purge: true,
        description: Some("Sluice domain events: one subject per aggregate".to_owned()),
        ..Default::default()
    };
    match js.get_stream(&cfg.stream).await {
        Ok(mut existing) => {
            let info = existing.info().await.map_err(Error::StreamInfo)?;
            let c = &info.config;
            if !c.allow_atomic_publish
                || !c.allow_direct
                || c.duplicate_window != cfg.duplicate_window
            {
                tracing::info!(stream = %cfg.stream, "updating stream settings Sluice relies on");
                let mut updated = c.clone();
                updated.allow_atomic_publish = true;
                updated.allow_direct = true;
                updated.duplicate_window = cfg.duplicate_window;
                js.update_stream(updated)
                    .await
                    .map_err(|source| Error::StreamSetup {
                        stream: cfg.stream.clone(),
                        source,
                    })?;
            }
            if c.max_age != Duration::ZERO || c.max_messages_per_subject > 0 {
                return Err(Error::StreamMisconfigured {
                    stream: cfg.stream.clone(),
                    reason:
                        "it has age or per-subject limits, which would delete events; remove them"
                            .to_owned(),
                });
            }
            Ok(existing)
        }
        Err(e) if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j) if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) => {
            js.create_stream(wanted)
                .await
                .map_err(|source| Error::StreamSetup {
                    stream: cfg.stream.clone(),
                    source,
                })
        }
        Err(e) => Err(Error::GetStream(e)),
    }
}

#[cfg(test)]
mod durability_tests {
    use super::*;

    fn safe() -> StreamState {
        StreamState {
            messages: 0,
            bytes: 0,
            first_position: 0,
            last_position: 0,
            replicas: 3,
            aggregates: 0,
            max_age: Duration::ZERO,
            max_bytes: -1,
            max_messages: -1,
            max_messages_per_subject: -1,
            duplicate_window: Duration::from_secs(120),
        }
    }

    #[test]
    fn each_risk_to_acknowledged_events_is_named() {
        let horizon = StoreConfig::default().retry_horizon();
        assert!(horizon < Duration::from_secs(120));
        assert!(safe().durability_warnings(None, true, horizon).is_empty());
        assert!(
            safe()
                .durability_warnings(Some(true), true, horizon)
                .is_empty()
        );
        let one = StreamState {
            replicas: 1,
            ..safe()
        };
        assert!(
            one.durability_warnings(Some(true), false, horizon)
                .is_empty()
        );
        let w = one.durability_warnings(Some(true), true, horizon);
        assert!(w[0].contains("production needs 3"), "{w:?}");
        assert!(one.durability_warnings(None, false, horizon)[0].contains("sync_interval"));
        assert!(
            safe().durability_warnings(Some(false), false, horizon)[0].contains("machine crashes")
        );
        let limited = StreamState {
            max_age: Duration::from_secs(3600),
            max_bytes: 1 << 30,
            max_messages_per_subject: 10,
            duplicate_window: Duration::from_secs(5),
            ..safe()
        };
        let w = limited.durability_warnings(Some(true), false, horizon);
        assert_eq!(w.len(), 4, "{w:?}");
    }
}
