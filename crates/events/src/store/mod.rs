//! The event store on JetStream (being split into one file per concern).

mod group_commit;
mod publish;

pub use group_commit::{BATCH_SIZE_BUCKETS, BatchSizeBucket, GroupCommitConfig, GroupCommitStats};
pub use publish::{
    AppendResult, EVENTS_STREAM, EventStore, ExpectedVersion, History, RecordedEvent, StoreConfig,
    StreamState,
};
