//! Expert Buffering: which of a node's experts stay resident when its
//! memory budget holds fewer than it serves.
//!
//! [`ExpertBuffer`] is the policy and the ledger, with no device behind it:
//! the owner of the experts asks it what to do for each expert a job needs
//! ([`Decision`]) and carries that out. Hot experts stay resident; a miss
//! either pages the expert in, evicting colder ones (heat is the decayed
//! count of tokens routed to each expert, the load the cluster balances;
//! least recently used breaks ties), streams it in for this job alone when
//! every resident expert is hotter, or computes it where it waits when
//! [`CostModel`] says moving its bytes costs more than computing its few
//! tokens there (MoNDE). An expert larger than the whole budget is always
//! streamed.

use std::collections::HashMap;
use std::hash::Hash;

/// How much each job's token counts outweigh the history: heat decays by
/// this factor per job, so an expert's heat tracks its tokens over the
/// last few dozen jobs.
const HEAT_DECAY: f64 = 0.95;

/// Parses a size with units: `6MiB`, `1.5 GiB`, `512k`, `4096` (bytes).
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|error| format!("invalid size {text:?} ({error}); write for example 6MiB or 2GB"))
}

/// Formats a byte count with binary units, as sizes are given.
pub fn format_byte_size(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

/// The speeds that decide between paging an expert in and computing it
/// where it waits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    /// Bytes per second into the resident tier (PCIe for a GPU).
    pub page_in_bytes_per_second: f64,
    /// FLOP/s of the resident tier.
    pub resident_flops: f64,
    /// FLOP/s of computing an expert where it waits (the host); None when
    /// nothing can compute it there.
    pub waiting_flops: Option<f64>,
}

impl CostModel {
    /// Whether computing `flops` where the expert waits beats moving its
    /// `bytes` in and computing there.
    pub fn prefers_waiting_tier(&self, bytes: u64, flops: f64) -> bool {
        let Some(waiting_flops) = self.waiting_flops else {
            return false;
        };
        let page_in = bytes as f64 / self.page_in_bytes_per_second + flops / self.resident_flops;
        flops / waiting_flops < page_in
    }
}

/// What to do with one expert a job needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<K> {
    /// Resident: compute it there.
    Hit,
    /// Page it in and keep it, after evicting `evict` (possibly none).
    PageIn { evict: Vec<K> },
    /// Page it in for this job alone: every resident expert is hotter, or
    /// it is larger than the budget.
    Stream,
    /// Compute it where it waits, without moving it.
    ComputeWhereItWaits,
}

/// Cumulative counts, as heartbeats and `moectl top` report them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BufferCounters {
    pub hits: u64,
    pub misses: u64,
    /// Bytes moved into the resident tier, kept or streamed.
    pub bytes_paged_in: u64,
    /// Misses computed where the expert waits.
    pub computed_where_waiting: u64,
}

#[derive(Debug, Clone, Copy)]
struct Resident {
    bytes: u64,
    /// The ledger's clock when a job last used it.
    last_used: u64,
}

/// The residency ledger of one device within a byte budget.
#[derive(Debug)]
pub struct ExpertBuffer<K> {
    budget: u64,
    used: u64,
    resident: HashMap<K, Resident>,
    heat: HashMap<K, f64>,
    /// Advances once per job.
    clock: u64,
    counters: BufferCounters,
}

impl<K: Copy + Eq + Hash + Ord + std::fmt::Debug> ExpertBuffer<K> {
    /// An empty ledger that keeps at most `budget` bytes resident.
    pub fn new(budget: u64) -> Self {
        Self {
            budget,
            used: 0,
            resident: HashMap::new(),
            heat: HashMap::new(),
            clock: 0,
            counters: BufferCounters::default(),
        }
    }

    /// Bytes resident now; never above the budget.
    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn counters(&self) -> BufferCounters {
        self.counters
    }

    pub fn is_resident(&self, key: &K) -> bool {
        self.resident.contains_key(key)
    }

    /// The resident experts, in key order.
    pub fn resident(&self) -> Vec<K> {
        let mut keys: Vec<K> = self.resident.keys().copied().collect();
        keys.sort();
        keys
    }

    /// Starts a job: ages every expert's heat and adds the job's tokens.
    pub fn begin_job(&mut self, demand: impl IntoIterator<Item = (K, usize)>) {
        self.clock += 1;
        for heat in self.heat.values_mut() {
            *heat *= HEAT_DECAY;
        }
        for (key, tokens) in demand {
            *self.heat.entry(key).or_insert(0.0) += tokens as f64;
        }
    }

    /// The expert's decayed token count.
    pub fn heat(&self, key: &K) -> f64 {
        self.heat.get(key).copied().unwrap_or(0.0)
    }

    /// Decides what to do with `key` (`bytes` when resident) for a job that
    /// gives it work of `flops`, and records the decision: a hit or a
    /// page-in counts as used now, evicted experts leave the ledger, and the
    /// caller must carry the decision out before the next one.
    pub fn decide(&mut self, key: K, bytes: u64, flops: f64, cost: &CostModel) -> Decision<K> {
        if let Some(resident) = self.resident.get_mut(&key) {
            resident.last_used = self.clock;
            self.counters.hits += 1;
            return Decision::Hit;
        }
        self.counters.misses += 1;
        if cost.prefers_waiting_tier(bytes, flops) {
            self.counters.computed_where_waiting += 1;
            return Decision::ComputeWhereItWaits;
        }
        self.counters.bytes_paged_in += bytes;
        match self.victims_for(key, bytes) {
            Some(evict) => {
                for victim in &evict {
                    self.remove(victim);
                }
                self.admit(key, bytes);
                Decision::PageIn { evict }
            }
            None => Decision::Stream,
        }
    }

    /// The coldest resident experts whose eviction makes room for `bytes`,
    /// if they are all colder than `key` (ties: least recently used first,
    /// and never one used in this job); None when `key` should not displace
    /// them or cannot fit at all.
    fn victims_for(&self, key: K, bytes: u64) -> Option<Vec<K>> {
        if bytes > self.budget {
            return None;
        }
        let mut candidates: Vec<(&K, &Resident)> = self
            .resident
            .iter()
            .filter(|(_, resident)| resident.last_used < self.clock)
            .collect();
        candidates.sort_by(|(a, a_resident), (b, b_resident)| {
            self.heat(a)
                .total_cmp(&self.heat(b))
                .then(a_resident.last_used.cmp(&b_resident.last_used))
                .then(a.cmp(b))
        });
        let incoming_heat = self.heat(&key);
        let mut free = self.budget - self.used;
        let mut victims = Vec::new();
        for (victim, resident) in candidates {
            if free >= bytes {
                break;
            }
            if self.heat(victim) > incoming_heat {
                return None;
            }
            free += resident.bytes;
            victims.push(*victim);
        }
        (free >= bytes).then_some(victims)
    }

    /// Records `key` resident without a decision (experts loaded at start,
    /// while the budget allows). Returns false, recording nothing, when it
    /// does not fit.
    pub fn admit(&mut self, key: K, bytes: u64) -> bool {
        if self.resident.contains_key(&key) {
            return true;
        }
        if self.used + bytes > self.budget {
            return false;
        }
        self.used += bytes;
        self.resident.insert(
            key,
            Resident {
                bytes,
                last_used: self.clock,
            },
        );
        true
    }

    /// Forgets `key`: evicted, or no longer served here.
    pub fn remove(&mut self, key: &K) {
        if let Some(resident) = self.resident.remove(key) {
            self.used -= resident.bytes;
        }
    }

    /// Forgets `key` entirely, its heat too (its replica left this node).
    pub fn forget(&mut self, key: &K) {
        self.remove(key);
        self.heat.remove(key);
    }
}

#[cfg(test)]
#[path = "buffering_tests.rs"]
mod tests;
