//! The Raft log, hard state, conf state and snapshots, kept durably in redb.
//!
//! Everything one Ready hands over (new entries, the hard state, a received
//! snapshot) is written in one redb transaction, which is fsynced before
//! the Ready's persisted messages are sent; a crash never leaves half of it.
//! Log compaction replaces the applied prefix of the log with a snapshot of
//! the state machine.
//!
//! Opening a store checks everything in it that raft-rs would otherwise
//! trust and panic on later: every record decodes, the log is contiguous
//! after the snapshot with terms that never decrease, and the hard state's
//! commit index lies within the log. A damaged store is refused with an
//! error that names its file and what is wrong.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{CoordinatorError, CoordinatorResult};

/// Log entries by index, protobuf-encoded.
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries");
/// `hard_state`, `conf_state` and `snapshot`, protobuf-encoded.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

/// What the store keeps in memory to answer raft's frequent questions
/// without a read transaction; always equal to what is on disk.
#[derive(Debug, Clone, Default)]
struct Mirror {
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the latest snapshot (0, 0 when none).
    snapshot_index: u64,
    snapshot_term: u64,
    /// Index of the last entry in the log (the snapshot index when empty).
    last_index: u64,
}

/// A redb-backed `raft::Storage`.
pub struct RaftStore {
    db: Database,
    /// The database file, named in errors about what it holds.
    path: PathBuf,
    mirror: Mutex<Mirror>,
}

fn storage_error(error: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(error.to_string().into()))
}

fn db_error(error: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Storage(error.to_string())
}

fn encode<M: protobuf::Message>(message: &M) -> Vec<u8> {
    message
        .write_to_bytes()
        .expect("raft messages always encode")
}

impl RaftStore {
    /// Opens (or creates) the store in `dir`. A new store starts with
    /// `initial_voters` as its configuration; an existing one keeps its own.
    pub fn open(dir: &Path, initial_voters: &[u64]) -> CoordinatorResult<Self> {
        let path = dir.join("raft.redb");
        let open_error = |error: &dyn std::fmt::Display| {
            CoordinatorError::Storage(format!("cannot open {}: {error}", path.display()))
        };
        std::fs::create_dir_all(dir).map_err(|error| open_error(&error))?;
        let db = Database::create(&path).map_err(|error| open_error(&error))?;
        let store = Self {
            db,
            path,
            mirror: Mutex::new(Mirror::default()),
        };
        store.load_or_initialise(initial_voters)?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An error saying that the store holds something raft cannot use.
    pub fn damaged(&self, what: impl std::fmt::Display) -> CoordinatorError {
        CoordinatorError::Storage(format!(
            "the raft store {} is damaged: {what}; restore it from a backup or remove it to rejoin the group empty",
            self.path.display()
        ))
    }

    fn decode_record<M: protobuf::Message>(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> CoordinatorResult<M> {
        M::parse_from_bytes(bytes)
            .map_err(|error| self.damaged(format_args!("the {name} does not decode ({error})")))
    }

    fn load_or_initialise(&self, initial_voters: &[u64]) -> CoordinatorResult<()> {
        let txn = self.db.begin_write().map_err(db_error)?;
        let mut mirror = Mirror::default();
        {
            let mut meta = txn.open_table(META).map_err(db_error)?;
            let entries = txn.open_table(ENTRIES).map_err(db_error)?;
            let stored_conf_state = meta
                .get("conf_state")
                .map_err(db_error)?
                .map(|bytes| bytes.value().to_vec());
            match stored_conf_state {
                Some(bytes) => mirror.conf_state = self.decode_record("conf state", &bytes)?,
                None => {
                    // A brand-new member: the group's first configuration,
                    // written exactly once.
                    mirror.conf_state.set_voters(initial_voters.to_vec());
                    meta.insert("conf_state", encode(&mirror.conf_state).as_slice())
                        .map_err(db_error)?;
                }
            }
            if let Some(bytes) = meta.get("hard_state").map_err(db_error)? {
                mirror.hard_state = self.decode_record("hard state", bytes.value())?;
            }
            if let Some(bytes) = meta.get("snapshot").map_err(db_error)? {
                let snapshot: Snapshot = self.decode_record("snapshot", bytes.value())?;
                mirror.snapshot_index = snapshot.get_metadata().index;
                mirror.snapshot_term = snapshot.get_metadata().term;
            }
            mirror.last_index = self.check_log(&entries, &mirror)?;
        }
        txn.commit().map_err(db_error)?;
        self.check_hard_state(&mirror)?;
        *self.mirror.lock().expect("store mirror") = mirror;
        Ok(())
    }

    /// Checks that every entry decodes, sits under its own index, follows
    /// the snapshot without a gap and has a term no lower than the one
    /// before; returns the last index.
    fn check_log(
        &self,
        entries: &impl ReadableTable<u64, &'static [u8]>,
        mirror: &Mirror,
    ) -> CoordinatorResult<u64> {
        let (mut last_index, mut last_term) = (mirror.snapshot_index, mirror.snapshot_term);
        for item in entries.iter().map_err(db_error)? {
            let (key, bytes) = item.map_err(db_error)?;
            let index = key.value();
            let entry: Entry = self.decode_record(&format!("log entry {index}"), bytes.value())?;
            if index != last_index + 1 || entry.index != index {
                return Err(self.damaged(format_args!(
                    "log entry {index} (holding index {}) does not follow index {last_index}",
                    entry.index
                )));
            }
            if entry.term < last_term {
                return Err(self.damaged(format_args!(
                    "log entry {index} has term {}, before the term {last_term} of the entry before it",
                    entry.term
                )));
            }
            (last_index, last_term) = (index, entry.term);
        }
        Ok(last_index)
    }

    /// Checks that the commit index lies within the log and the term is
    /// no earlier than the log's.
    fn check_hard_state(&self, mirror: &Mirror) -> CoordinatorResult<()> {
        let hard_state = &mirror.hard_state;
        if hard_state.commit < mirror.snapshot_index || hard_state.commit > mirror.last_index {
            return Err(self.damaged(format_args!(
                "the hard state commits index {}, outside the log [{}, {}]",
                hard_state.commit, mirror.snapshot_index, mirror.last_index
            )));
        }
        if hard_state.term < mirror.snapshot_term {
            return Err(self.damaged(format_args!(
                "the hard state's term {} is before the snapshot's term {}",
                hard_state.term, mirror.snapshot_term
            )));
        }
        Ok(())
    }

    /// Returns the latest snapshot, if the log was ever compacted.
    pub fn latest_snapshot(&self) -> CoordinatorResult<Option<Snapshot>> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let meta = txn.open_table(META).map_err(db_error)?;
        meta.get("snapshot")
            .map_err(db_error)?
            .map(|bytes| self.decode_record("snapshot", bytes.value()))
            .transpose()
    }

    /// Returns the index the log was last compacted to (0 if never).
    pub fn latest_snapshot_index(&self) -> u64 {
        self.mirror.lock().expect("store mirror").snapshot_index
    }

    /// Returns the current hard state.
    pub fn hard_state(&self) -> HardState {
        self.mirror.lock().expect("store mirror").hard_state.clone()
    }

    /// Durably stores what one Ready asks to persist, in one transaction:
    /// a snapshot received from the leader, new entries (replacing any
    /// conflicting suffix) and the hard state.
    pub fn persist(
        &self,
        snapshot: Option<&Snapshot>,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> CoordinatorResult<()> {
        let mut mirror = self.mirror.lock().expect("store mirror").clone();
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut meta = txn.open_table(META).map_err(db_error)?;
            let mut table = txn.open_table(ENTRIES).map_err(db_error)?;
            if let Some(snapshot) = snapshot {
                let metadata = snapshot.get_metadata();
                table.retain(|_, _| false).map_err(db_error)?;
                meta.insert("snapshot", encode(snapshot).as_slice())
                    .map_err(db_error)?;
                meta.insert("conf_state", encode(metadata.get_conf_state()).as_slice())
                    .map_err(db_error)?;
                mirror.conf_state = metadata.get_conf_state().clone();
                mirror.snapshot_index = metadata.index;
                mirror.snapshot_term = metadata.term;
                mirror.last_index = metadata.index;
                mirror.hard_state.commit = mirror.hard_state.commit.max(metadata.index);
                mirror.hard_state.term = mirror.hard_state.term.max(metadata.term);
            }
            if let Some(first) = entries.first() {
                let from = first.index;
                table.retain_in(from.., |_, _| false).map_err(db_error)?;
                for entry in entries {
                    table
                        .insert(entry.index, encode(entry).as_slice())
                        .map_err(db_error)?;
                }
                mirror.last_index = entries
                    .last()
                    .map_or(mirror.last_index, |entry| entry.index);
            }
            if let Some(hard_state) = hard_state {
                mirror.hard_state = hard_state.clone();
            }
            meta.insert("hard_state", encode(&mirror.hard_state).as_slice())
                .map_err(db_error)?;
        }
        txn.commit().map_err(db_error)?;
        *self.mirror.lock().expect("store mirror") = mirror;
        Ok(())
    }

    /// Records a new commit index (from a LightReady).
    pub fn persist_commit(&self, commit: u64) -> CoordinatorResult<()> {
        let mut hard_state = self.hard_state();
        hard_state.commit = commit;
        self.persist(None, &[], Some(&hard_state))
    }

    /// Records a configuration applied from a conf-change entry.
    pub fn persist_conf_state(&self, conf_state: &ConfState) -> CoordinatorResult<()> {
        let txn = self.db.begin_write().map_err(db_error)?;
        txn.open_table(META)
            .map_err(db_error)?
            .insert("conf_state", encode(conf_state).as_slice())
            .map_err(db_error)?;
        txn.commit().map_err(db_error)?;
        self.mirror.lock().expect("store mirror").conf_state = conf_state.clone();
        Ok(())
    }

    /// Replaces the log up to `index` (applied, with term `term`) by a
    /// snapshot holding `data`, the state machine at that index.
    pub fn compact(&self, index: u64, term: u64, data: Vec<u8>) -> CoordinatorResult<()> {
        let mut mirror = self.mirror.lock().expect("store mirror").clone();
        if index <= mirror.snapshot_index {
            return Ok(());
        }
        let mut snapshot = Snapshot::default();
        snapshot.set_data(data.into());
        let metadata = snapshot.mut_metadata();
        metadata.index = index;
        metadata.term = term;
        metadata.set_conf_state(mirror.conf_state.clone());
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut meta = txn.open_table(META).map_err(db_error)?;
            let mut table = txn.open_table(ENTRIES).map_err(db_error)?;
            table.retain_in(..=index, |_, _| false).map_err(db_error)?;
            meta.insert("snapshot", encode(&snapshot).as_slice())
                .map_err(db_error)?;
        }
        txn.commit().map_err(db_error)?;
        mirror.snapshot_index = index;
        mirror.snapshot_term = term;
        mirror.last_index = mirror.last_index.max(index);
        *self.mirror.lock().expect("store mirror") = mirror;
        Ok(())
    }

    fn read_entry(&self, index: u64) -> raft::Result<Option<Entry>> {
        let txn = self.db.begin_read().map_err(storage_error)?;
        let table = txn.open_table(ENTRIES).map_err(storage_error)?;
        let Some(bytes) = table.get(index).map_err(storage_error)? else {
            return Ok(None);
        };
        Entry::parse_from_bytes(bytes.value())
            .map(Some)
            .map_err(storage_error)
    }
}

impl raft::Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let mirror = self.mirror.lock().expect("store mirror");
        Ok(RaftState::new(
            mirror.hard_state.clone(),
            mirror.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        let (first, last) = {
            let mirror = self.mirror.lock().expect("store mirror");
            (mirror.snapshot_index + 1, mirror.last_index)
        };
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(
            high <= last + 1,
            "raft asked for entries up to {high}, the log ends at {last}"
        );
        let txn = self.db.begin_read().map_err(storage_error)?;
        let table = txn.open_table(ENTRIES).map_err(storage_error)?;
        let mut entries = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        for item in table.range(low..high).map_err(storage_error)? {
            let (_, bytes) = item.map_err(storage_error)?;
            size += bytes.value().len() as u64;
            if !entries.is_empty() && max_size.is_some_and(|max| size > max) {
                break;
            }
            entries.push(Entry::parse_from_bytes(bytes.value()).map_err(storage_error)?);
        }
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let (snapshot_index, snapshot_term, last) = {
            let mirror = self.mirror.lock().expect("store mirror");
            (
                mirror.snapshot_index,
                mirror.snapshot_term,
                mirror.last_index,
            )
        };
        if index == snapshot_index {
            return Ok(snapshot_term);
        }
        if index < snapshot_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index > last {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        match self.read_entry(index)? {
            Some(entry) => Ok(entry.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.mirror.lock().expect("store mirror").snapshot_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.mirror.lock().expect("store mirror").last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        match self.latest_snapshot().map_err(storage_error)? {
            Some(snapshot) if snapshot.get_metadata().index >= request_index => Ok(snapshot),
            _ => Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use raft::Storage;

    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("e{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    #[test]
    fn log_survives_reopening_and_conflicting_suffixes_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = RaftStore::open(dir.path(), &[1, 2, 3]).unwrap();
        assert_eq!(
            store.initial_state().unwrap().conf_state.voters,
            vec![1, 2, 3]
        );
        let hard_state = HardState {
            term: 2,
            commit: 2,
            ..Default::default()
        };
        store
            .persist(
                None,
                &[entry(1, 1), entry(2, 1), entry(3, 1)],
                Some(&hard_state),
            )
            .unwrap();
        store
            .persist(None, &[entry(3, 2), entry(4, 2)], None)
            .unwrap();
        drop(store);

        let store = RaftStore::open(dir.path(), &[9]).unwrap();
        let state = store.initial_state().unwrap();
        assert_eq!(
            state.conf_state.voters,
            vec![1, 2, 3],
            "the first configuration is kept"
        );
        assert_eq!((state.hard_state.term, state.hard_state.commit), (2, 2));
        assert_eq!(
            (store.first_index().unwrap(), store.last_index().unwrap()),
            (1, 4)
        );
        let entries = store
            .entries(1, 5, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            entries
                .iter()
                .map(|e| (e.index, e.term))
                .collect::<Vec<_>>(),
            vec![(1, 1), (2, 1), (3, 2), (4, 2)]
        );
        assert_eq!(store.term(3).unwrap(), 2);
        assert_eq!(
            store
                .entries(1, 5, 1, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn compaction_keeps_a_snapshot_and_the_rest_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = RaftStore::open(dir.path(), &[1]).unwrap();
        // Only applied, so committed, entries are compacted.
        let hard_state = HardState {
            term: 1,
            commit: 5,
            ..Default::default()
        };
        store
            .persist(
                None,
                &(1..=6).map(|index| entry(index, 1)).collect::<Vec<_>>(),
                Some(&hard_state),
            )
            .unwrap();
        store.compact(4, 1, b"state at 4".to_vec()).unwrap();
        drop(store);
        let store = RaftStore::open(dir.path(), &[1]).unwrap();
        assert_eq!(
            (store.first_index().unwrap(), store.last_index().unwrap()),
            (5, 6)
        );
        assert_eq!(store.term(4).unwrap(), 1);
        assert!(matches!(
            store.term(3),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        let snapshot = store.snapshot(4, 2).unwrap();
        assert_eq!(&snapshot.data[..], b"state at 4");
        assert_eq!(snapshot.get_metadata().get_conf_state().voters, vec![1]);
        assert!(store.snapshot(5, 2).is_err());
    }

    /// Writes `bytes` under `key` of `table`, as damage to the disk would.
    fn overwrite<K: redb::Key + 'static>(
        dir: &Path,
        table: TableDefinition<K, &[u8]>,
        key: K::SelfType<'_>,
        bytes: &[u8],
    ) {
        let db = Database::create(dir.join("raft.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(table).unwrap().insert(key, bytes).unwrap();
        txn.commit().unwrap();
    }

    /// A store holding entries 1..=3 of term 1, committed up to 2.
    fn written_store(dir: &Path) {
        let store = RaftStore::open(dir, &[1]).unwrap();
        let hard_state = HardState {
            term: 1,
            commit: 2,
            ..Default::default()
        };
        let entries: Vec<Entry> = (1..=3).map(|index| entry(index, 1)).collect();
        store.persist(None, &entries, Some(&hard_state)).unwrap();
    }

    fn open_error(dir: &Path) -> String {
        match RaftStore::open(dir, &[1]) {
            Ok(_) => panic!("a damaged store opened"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn damaged_records_are_refused_naming_the_file_and_the_record() {
        let file = |dir: &tempfile::TempDir| dir.path().join("raft.redb").display().to_string();
        for record in ["hard state", "conf state", "snapshot"] {
            let dir = tempfile::tempdir().unwrap();
            written_store(dir.path());
            overwrite(dir.path(), META, &record.replace(' ', "_"), b"\xff\xff\xff");
            let error = open_error(dir.path());
            assert!(error.contains(&file(&dir)), "{error}");
            assert!(
                error.contains(&format!("the {record} does not decode")),
                "{error}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        written_store(dir.path());
        overwrite(dir.path(), ENTRIES, 2, b"\xff\xff\xff");
        let error = open_error(dir.path());
        assert!(error.contains(&file(&dir)), "{error}");
        assert!(error.contains("log entry 2 does not decode"), "{error}");
    }

    #[test]
    fn a_log_with_a_gap_or_a_commit_past_its_end_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        written_store(dir.path());
        overwrite(dir.path(), ENTRIES, 5, &encode(&entry(5, 1)));
        let error = open_error(dir.path());
        assert!(error.contains("log entry 5"), "{error}");
        assert!(error.contains("does not follow index 3"), "{error}");

        let dir = tempfile::tempdir().unwrap();
        written_store(dir.path());
        overwrite(dir.path(), ENTRIES, 3, &encode(&entry(3, 0)));
        let error = open_error(dir.path());
        assert!(error.contains("log entry 3 has term 0"), "{error}");

        let dir = tempfile::tempdir().unwrap();
        written_store(dir.path());
        let past_the_end = HardState {
            term: 1,
            commit: u64::MAX,
            ..Default::default()
        };
        overwrite(dir.path(), META, "hard_state", &encode(&past_the_end));
        let error = open_error(dir.path());
        assert!(
            error.contains(&format!(
                "commits index {}, outside the log [0, 3]",
                u64::MAX
            )),
            "{error}"
        );
    }
}
