//! Reads one aggregate's events with direct gets (no consumer).
//!
//! `EventStore::read` opens an ordered consumer per call, which the server
//! keeps for its inactivity threshold (30 s) after the read. Sagas read
//! small streams very often (every reply, claim, timeout and transition
//! reads the instance's log; every command reads its target), and thousands
//! of lingering consumers hit the server's consumer limit. A direct get
//! (`allow_direct` on `EVENTS`) per event costs one request and leaves
//! nothing behind. A replica serving a direct get may lag the leader; every
//! write based on such a read is an optimistic append, so a stale read
//! costs a conflict and a reload, never a wrong write.

use async_nats::jetstream::stream::DirectGetErrorKind;
use sluice_events::{Envelope, EventStore, RecordedEvent, StreamId};

use crate::model::SagaError;

/// Every event of `stream_id`, in order.
pub(crate) async fn read_events(
    store: &EventStore,
    stream_id: &StreamId,
) -> Result<Vec<RecordedEvent>, SagaError> {
    let nats = |e: &dyn std::fmt::Display| SagaError::Nats {
        doing: "reading a stream with direct gets",
        reason: e.to_string(),
    };
    let config = store.config();
    let stream = store
        .jetstream()
        .get_stream_no_info(&config.stream)
        .await
        .map_err(|e| nats(&e))?;
    let subject = stream_id.subject(&config.subject_prefix);
    let mut out = Vec::new();
    let mut next = 1;
    loop {
        match stream
            .direct_get_next_for_subject(subject.clone(), Some(next))
            .await
        {
            Ok(m) => {
                let envelope = Envelope::decode(Some(&m.headers), &m.payload, usize::MAX)?;
                next = m.sequence + 1;
                out.push(RecordedEvent {
                    stream_id: stream_id.clone(),
                    position: m.sequence,
                    envelope,
                });
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(nats(&e)),
        }
    }
}
