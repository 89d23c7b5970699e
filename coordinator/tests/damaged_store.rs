//! A coordinator whose raft store holds a snapshot that does not decode
//! refuses to start with an error naming the file and the snapshot,
//! rather than panicking or failing with a bare parse error.

use std::sync::Arc;

use moemesh_coordinator::node::{RaftNode, RaftNodeConfig, RaftTransport};
use moemesh_coordinator::storage::RaftStore;
use raft::prelude::{Entry, HardState, Message};

struct Nowhere;

impl RaftTransport for Nowhere {
    fn send(&self, _: Vec<Message>) {}
}

#[tokio::test]
async fn a_snapshot_that_does_not_decode_is_named_with_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("coordinator-1");
    let store = RaftStore::open(&data_dir, &[1]).unwrap();
    let entries: Vec<Entry> = (1..=3)
        .map(|index| Entry {
            index,
            term: 1,
            ..Default::default()
        })
        .collect();
    let hard_state = HardState {
        term: 1,
        commit: 3,
        ..Default::default()
    };
    store.persist(None, &entries, Some(&hard_state)).unwrap();
    store
        .compact(2, 1, b"not a cluster state".to_vec())
        .unwrap();
    let file = store.path().display().to_string();
    drop(store);

    let config = RaftNodeConfig::new(1, vec![1], data_dir);
    let Err(error) = RaftNode::spawn(config, Arc::new(Nowhere)) else {
        panic!("a coordinator started from a snapshot that does not decode");
    };
    let error = error.to_string();
    assert!(error.contains(&file), "{error}");
    assert!(error.contains("snapshot at index 2"), "{error}");
    assert!(error.contains("does not decode"), "{error}");
}
