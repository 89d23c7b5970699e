//! The flags that choose an expert node's device and its memory budgets,
//! shared by `moemesh expert` and `moemesh up` (which passes them on).

use moemesh_core::compute::Device;
use moemesh_core::compute::buffering::parse_byte_size;
use moemesh_core::compute::device::probe_device;

#[derive(clap::Args, Clone, Debug, Default)]
pub struct MemoryTierArgs {
    /// Where experts compute: cpu, or cuda:N for GPU N (`cuda` is cuda:0;
    /// needs a moemesh built with `--features cuda`).
    #[arg(long, env = "MOEMESH_DEVICE", default_value = "cpu")]
    pub device: Device,
    /// Host memory for expert weights, with units (6MiB, 40GB). On the
    /// CPU the hottest experts stay resident within it and the others
    /// wait in the page cache; for a GPU it bounds the pinned memory cold
    /// experts wait in. Default: no limit.
    #[arg(long, env = "MOEMESH_MEMORY_BUDGET", value_parser = parse_byte_size)]
    pub memory_budget: Option<u64>,
    /// GPU memory for expert weights, with units (70GiB); the hottest
    /// experts stay resident within it. Default: no limit.
    #[arg(long, env = "MOEMESH_DEVICE_MEMORY_BUDGET", value_parser = parse_byte_size)]
    pub device_memory_budget: Option<u64>,
}

/// What a node tells the coordinators about its memory tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierSizes {
    /// Bytes it keeps resident where it computes.
    pub resident_bytes: u64,
    /// Bytes of the next tier where the others wait.
    pub buffer_bytes: u64,
}

impl MemoryTierArgs {
    /// The flags again, for a child process.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["--device".to_string(), self.device.to_string()];
        if let Some(bytes) = self.memory_budget {
            args.extend(["--memory-budget".into(), bytes.to_string()]);
        }
        if let Some(bytes) = self.device_memory_budget {
            args.extend(["--device-memory-budget".into(), bytes.to_string()]);
        }
        args
    }

    /// Checks the device can be used (a clear error otherwise, never a
    /// panic) and sizes the tiers: a budget where one is given, otherwise
    /// the device's memory (`host_memory` for the CPU).
    pub fn tier_sizes(&self, host_memory: u64) -> anyhow::Result<TierSizes> {
        let device = probe_device(self.device)?;
        Ok(match self.device {
            Device::Cpu => {
                let resident_bytes = self.memory_budget.unwrap_or(host_memory);
                TierSizes {
                    resident_bytes,
                    // Cold experts wait in the page cache: what memory the
                    // budget leaves.
                    buffer_bytes: host_memory.saturating_sub(resident_bytes),
                }
            }
            Device::Cuda(_) => TierSizes {
                resident_bytes: self
                    .device_memory_budget
                    .or(device.memory_bytes)
                    .unwrap_or(0),
                buffer_bytes: self.memory_budget.unwrap_or(host_memory),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        tiers: MemoryTierArgs,
    }

    fn parse(args: &[&str]) -> Result<MemoryTierArgs, clap::Error> {
        Flags::try_parse_from(std::iter::once("moemesh").chain(args.iter().copied()))
            .map(|flags| flags.tiers)
    }

    #[test]
    fn sizes_take_units_and_pass_on_to_children_unchanged() {
        let tiers = parse(&[
            "--device",
            "cuda:1",
            "--memory-budget",
            "6MiB",
            "--device-memory-budget",
            "1.5GiB",
        ])
        .unwrap();
        assert_eq!(tiers.device, Device::Cuda(1));
        assert_eq!(tiers.memory_budget, Some(6 << 20));
        assert_eq!(tiers.device_memory_budget, Some(3 << 29));
        let child_args = tiers.to_args();
        let again = parse(&child_args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        assert_eq!(
            (
                again.device,
                again.memory_budget,
                again.device_memory_budget
            ),
            (
                tiers.device,
                tiers.memory_budget,
                tiers.device_memory_budget
            )
        );
        let error = parse(&["--memory-budget", "lots"]).unwrap_err().to_string();
        assert!(error.contains("6MiB"), "{error}");
    }

    #[test]
    fn a_cpu_budget_leaves_the_rest_of_memory_to_the_page_cache() {
        let tiers = parse(&["--memory-budget", "1GiB"]).unwrap();
        let sizes = tiers.tier_sizes(16 << 30).unwrap();
        assert_eq!(sizes.resident_bytes, 1 << 30);
        assert_eq!(sizes.buffer_bytes, 15 << 30);
        let unbudgeted = parse(&[]).unwrap().tier_sizes(16 << 30).unwrap();
        assert_eq!(
            (unbudgeted.resident_bytes, unbudgeted.buffer_bytes),
            (16 << 30, 0)
        );
    }
}
