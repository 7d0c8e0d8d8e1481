//! What other crates need of the connection beside the event log: the
//! event stream and the other streams (DLQ, redrive, audit, advisories,
//! saga timers) to put consumers on, buckets, publishes to subjects that are
//! not events, and the connection's state.
//!
//! These answer the client's own typed errors, so each caller keeps saying
//! in its own error type what it was doing.

use async_nats::jetstream::context::{
    CreateKeyValueError, CreateStreamError, GetStreamError, KeyValueError, PublishAckFuture,
    PublishError,
};
use async_nats::jetstream::{kv, stream};
use bytes::Bytes;

use super::EventStore;

impl EventStore {
    /// The event stream (its current info included), to create or get
    /// consumers on.
    pub async fn event_stream(&self) -> Result<stream::Stream, GetStreamError> {
        self.stream_named(&self.config().stream).await
    }

    /// The stream `name` (its current info included).
    pub async fn stream_named(&self, name: &str) -> Result<stream::Stream, GetStreamError> {
        self.jetstream().get_stream(name).await
    }

    /// The stream `name` without asking for its info (for direct gets).
    pub async fn stream_handle(&self, name: &str) -> Result<stream::Stream<()>, GetStreamError> {
        self.jetstream().get_stream_no_info(name).await
    }

    /// Creates the stream `config.name` unless it exists; a stream another
    /// process created meanwhile counts as created. An existing stream is
    /// left as it is (its settings are not compared).
    pub async fn ensure_stream(&self, config: stream::Config) -> Result<(), CreateStreamError> {
        let js = self.jetstream();
        if js.get_stream(&config.name).await.is_ok() {
            return Ok(());
        }
        let name = config.name.clone();
        match js.create_stream(config).await {
            Ok(_) => Ok(()),
            // Another replica created it between our check and our create.
            Err(_) if js.get_stream(&name).await.is_ok() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The key-value bucket `bucket`, if it exists.
    pub async fn key_value(&self, bucket: &str) -> Result<kv::Store, KeyValueError> {
        self.jetstream().get_key_value(bucket).await
    }

    /// The key-value bucket `config.bucket`, created (with the config's
    /// replicas) when missing; a bucket a concurrent creator made is taken.
    /// An existing bucket is left as it is.
    pub async fn ensure_key_value(
        &self,
        config: kv::Config,
    ) -> Result<kv::Store, CreateKeyValueError> {
        let js = self.jetstream();
        if let Ok(store) = js.get_key_value(&config.bucket).await {
            return Ok(store);
        }
        let bucket = config.bucket.clone();
        match js.create_key_value(config).await {
            Ok(store) => Ok(store),
            Err(e) => js.get_key_value(bucket).await.map_err(|_| e),
        }
    }

    /// Publishes to a subject outside the event log (a dead-letter copy, a
    /// saga timer, an audit record) on JetStream; await the returned future
    /// for the stream's ack. Nothing of the event log's checks applies.
    pub async fn publish_to<S: async_nats::subject::ToSubject>(
        &self,
        subject: S,
        headers: async_nats::HeaderMap,
        payload: Bytes,
    ) -> Result<PublishAckFuture, PublishError> {
        self.jetstream()
            .publish_with_headers(subject, headers, payload)
            .await
    }

    /// Publishes `payload` on core NATS, outside any stream and without an
    /// ack: what a hand-written acknowledgement (`+WPI`, `+TERM <reason>`)
    /// to a message's reply subject is.
    pub async fn publish_reply(
        &self,
        reply: async_nats::Subject,
        payload: Bytes,
    ) -> Result<(), async_nats::client::PublishError> {
        self.client().publish(reply, payload).await
    }

    /// Sends what the connection has buffered (acks are fire-and-forget
    /// publishes) and waits until the server has it.
    pub async fn flush(&self) -> Result<(), async_nats::client::FlushError> {
        self.client().flush().await
    }

    /// True while the connection to the server is up.
    pub fn is_connected(&self) -> bool {
        self.client().connection_state() == async_nats::connection::State::Connected
    }

    /// What the server said about itself when the connection was made
    /// (version, limits such as `max_payload`, JetStream domain).
    pub fn server_info(&self) -> async_nats::ServerInfo {
        self.client().server_info()
    }
}
