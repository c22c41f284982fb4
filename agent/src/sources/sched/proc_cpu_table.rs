//! The per-process CPU table, read without a syscall.
//!
//! The kernel programs charge each (process, scenario) key's CPU time to a
//! *row*: `PROC_CPU_ROW` maps the key to its row, `PROC_CPU_ROW_KEYS[row]`
//! names the row's key (tgid 0: free), and
//! `PROC_CPU_NS[cpu * MAX_PROCESSES + row]` holds the nanoseconds the key has
//! run on each CPU, cumulative. Each CPU adds to its own region only, so the
//! kernel needs no atomics. Both arrays are `BPF_F_MMAPABLE` and mapped here:
//! a window's read is a walk over memory, in row order. (It was a
//! `BPF_MAP_LOOKUP_BATCH` over a per-CPU hash map, which visits every bucket
//! and copies each one out with its own checks: 40% of the agent's window at
//! 5,000 processes.)
//!
//! Rows come from `PROC_CPU_FREE_ROWS`, a stack filled here before the
//! programs attach, lowest row on top; the kernel pops one at a key's first
//! charge. A row goes back only through [`ProcCpuTable::release`], once its
//! process has exited and its last figures have been read: the key leaves
//! `PROC_CPU_ROW` first (so a later charge under the same key, a reused PID,
//! takes a fresh row), then the row is cleared and pushed back.
//!
//! At a cgroup move the kernel *retires* the process's rows: it removes
//! their keys from `PROC_CPU_ROW` (the rows keep their key in
//! `PROC_CPU_ROW_KEYS` and their figures), so the process's next charge
//! opens fresh rows and two rows may name one key for a while; userspace
//! releases a retired row once it has read it after the move.
//!
//! Limit: a thread of an exited process that looked its row up just before
//! the release and adds after it leaves those nanoseconds in the released
//! row, and the row's next owner is charged them (a deleted hash key had
//! the same window, and lost them).
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;

use agent_common::{ProcScenarioKey, MAX_PROCESSES};
use aya::maps::{HashMap, Map, MapData, Stack};
use aya::Ebpf;

use crate::error::AgentError;

const ROW: &str = "PROC_CPU_ROW";
const FREE_ROWS: &str = "PROC_CPU_FREE_ROWS";
const ROW_KEYS: &str = "PROC_CPU_ROW_KEYS";
const CPU_NS: &str = "PROC_CPU_NS";
const ROWS: usize = MAX_PROCESSES as usize;

/// Entries of `PROC_CPU_NS` for `possible_cpus` (set on the loader).
pub fn cpu_ns_entries(possible_cpus: usize) -> Result<u32, AgentError> {
    u32::try_from(possible_cpus.saturating_mul(ROWS))
        .map_err(|_| AgentError::Ebpf(format!("{possible_cpus} possible CPUs: {CPU_NS} too large")))
}

/// A shared read-write mapping of a `BPF_F_MMAPABLE` array of `u64`s.
struct MappedArray {
    base: NonNull<u64>,
    len: usize,
    // The map stays open as long as its mapping.
    _map: MapData,
}

// SAFETY: the mapping is plain memory shared with the kernel programs; this
// struct only reads and writes it with volatile accesses of whole u64s.
unsafe impl Send for MappedArray {}

impl MappedArray {
    fn new(map: MapData, name: &str, len: usize) -> Result<Self, AgentError> {
        let bytes = len * std::mem::size_of::<u64>();
        // SAFETY: a new shared mapping of the map's whole value area (the
        // kernel refuses anything larger or a map without BPF_F_MMAPABLE).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(AgentError::Ebpf(format!(
                "mapping {name} ({bytes} bytes): {}",
                std::io::Error::last_os_error()
            )));
        }
        let base = NonNull::new(ptr.cast::<u64>())
            .ok_or_else(|| AgentError::Ebpf(format!("mapping {name}: null mapping")))?;
        Ok(MappedArray {
            base,
            len,
            _map: map,
        })
    }

    #[inline]
    fn get(&self, i: usize) -> u64 {
        assert!(i < self.len);
        // SAFETY: in bounds (checked), 8-byte aligned (page-aligned base).
        unsafe { self.base.as_ptr().add(i).read_volatile() }
    }

    fn set(&self, i: usize, value: u64) {
        assert!(i < self.len);
        // SAFETY: as in `get`.
        unsafe { self.base.as_ptr().add(i).write_volatile(value) }
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe {
            libc::munmap(
                self.base.as_ptr().cast(),
                self.len * std::mem::size_of::<u64>(),
            )
        };
    }
}

/// One window's read of the table: rows in ascending order, their keys, and
/// `cpus` values per row (row-major) in one flat buffer.
#[derive(Default)]
pub struct TableRead {
    pub rows: Vec<u32>,
    pub keys: Vec<ProcScenarioKey>,
    pub values: Vec<u64>,
    pub cpus: usize,
}

impl TableRead {
    pub fn values_of(&self, at: usize) -> &[u64] {
        &self.values[at * self.cpus..(at + 1) * self.cpus]
    }
}

/// The userspace end of the per-process CPU table (see the module note).
pub struct ProcCpuTable {
    rows: HashMap<MapData, ProcScenarioKey, u32>,
    free_rows: Stack<MapData, u32>,
    row_keys: MappedArray,
    cpu_ns: MappedArray,
    possible_cpus: usize,
}

fn key_bits(key: &ProcScenarioKey) -> u64 {
    // SAFETY: ProcScenarioKey is repr(C), two u32s: 8 bytes, no padding.
    unsafe { std::mem::transmute::<ProcScenarioKey, u64>(*key) }
}

fn key_from_bits(bits: u64) -> ProcScenarioKey {
    // SAFETY: as in `key_bits`.
    unsafe { std::mem::transmute::<u64, ProcScenarioKey>(bits) }
}

impl ProcCpuTable {
    /// Takes the table's maps from `ebpf`, maps its arrays and fills the free
    /// rows. Call before the programs attach (a charge meanwhile finds no
    /// free row and is counted as lost).
    pub fn open(ebpf: &mut Ebpf, possible_cpus: usize) -> Result<Self, AgentError> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| AgentError::Ebpf(format!("map {name} missing")))
        };
        let rows = HashMap::try_from(take(ROW)?).map_err(|e| AgentError::ebpf(ROW, e))?;
        let mut free_rows: Stack<MapData, u32> =
            Stack::try_from(take(FREE_ROWS)?).map_err(|e| AgentError::ebpf(FREE_ROWS, e))?;
        let array = |map: Map, name: &str| match map {
            Map::Array(data) => Ok(data),
            _ => Err(AgentError::Ebpf(format!("map {name} is not an array"))),
        };
        let row_keys = MappedArray::new(array(take(ROW_KEYS)?, ROW_KEYS)?, ROW_KEYS, ROWS)?;
        let cpu_ns = MappedArray::new(
            array(take(CPU_NS)?, CPU_NS)?,
            CPU_NS,
            cpu_ns_entries(possible_cpus)? as usize,
        )?;
        for row in (0..MAX_PROCESSES).rev() {
            free_rows
                .push(row, 0)
                .map_err(|e| AgentError::ebpf("filling PROC_CPU_FREE_ROWS", e))?;
        }
        Ok(ProcCpuTable {
            rows,
            free_rows,
            row_keys,
            cpu_ns,
            possible_cpus,
        })
    }

    /// Every owned row, with its key and its cumulative ns on CPUs
    /// `0..cpus` (CPUs past the possible ones read 0), into `read`.
    pub fn read(&self, cpus: usize, read: &mut TableRead) {
        read.rows.clear();
        read.keys.clear();
        read.values.clear();
        read.cpus = cpus;
        for row in 0..ROWS {
            let key = key_from_bits(self.row_keys.get(row));
            if key.tgid != 0 {
                read.rows.push(row as u32);
                read.keys.push(key);
            }
        }
        read.values.resize(read.rows.len() * cpus, 0);
        // CPU by CPU: each CPU's region is walked in ascending rows.
        for cpu in 0..cpus.min(self.possible_cpus) {
            let region = cpu * ROWS;
            for (at, row) in read.rows.iter().enumerate() {
                read.values[at * cpus + cpu] = self.cpu_ns.get(region + *row as usize);
            }
        }
    }

    /// The keys owning a row now.
    pub fn keys(&self) -> Vec<ProcScenarioKey> {
        (0..ROWS)
            .map(|row| key_from_bits(self.row_keys.get(row)))
            .filter(|key| key.tgid != 0)
            .collect()
    }

    /// Gives back the row of `key`, whose process has exited and whose last
    /// figures have been read.
    pub fn release(&mut self, row: u32, key: &ProcScenarioKey) -> Result<(), AgentError> {
        let row_at = row as usize;
        if self.row_keys.get(row_at) != key_bits(key) {
            return Err(AgentError::Ebpf(format!(
                "row {row} of {ROW_KEYS} is not owned by process {} scenario {}",
                key.tgid, key.scenario
            )));
        }
        // A row retired at a cgroup move no longer holds the key: the key's
        // row now, if any, is another one, and stays.
        if self.rows.get(key, 0).ok() == Some(row) {
            self.rows
                .remove(key)
                .map_err(|e| AgentError::ebpf(ROW, e))?;
        }
        self.row_keys.set(row_at, 0);
        for cpu in 0..self.possible_cpus {
            self.cpu_ns.set(cpu * ROWS + row_at, 0);
        }
        self.free_rows
            .push(row, 0)
            .map_err(|e| AgentError::ebpf("giving a row back to PROC_CPU_FREE_ROWS", e))
    }
}
