//! Reading a whole per-CPU hash map with `BPF_MAP_LOOKUP_BATCH` (kernel 5.6+):
//! a few syscalls per window instead of two per key (get_next_key + lookup),
//! which is what aya's iterator does. aya 0.14 has no batch API, so this is
//! the raw `bpf(2)` call; callers fall back to the iterator on EINVAL/ENOTSUPP.
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries fetched per call; the buffers are reused across windows.
const CHUNK_ENTRIES: usize = 1024;

/// `union bpf_attr`, the `batch` member (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Batch reader for a per-CPU hash map with `u64` values.
pub struct PerCpuBatchReader {
    fd: OwnedFd,
    key_size: usize,
    possible_cpus: usize,
    keys: Vec<u8>,
    values: Vec<u64>,
}

impl PerCpuBatchReader {
    pub fn new(fd: OwnedFd, key_size: usize, possible_cpus: usize) -> Self {
        PerCpuBatchReader {
            fd,
            key_size,
            possible_cpus,
            keys: vec![0; CHUNK_ENTRIES * key_size],
            values: vec![0; CHUNK_ENTRIES * possible_cpus],
        }
    }

    /// Calls `each(key_bytes, per_cpu_values)` for every entry of the map.
    pub fn for_each(&mut self, mut each: impl FnMut(&[u8], &[u64])) -> io::Result<()> {
        let mut in_batch: u32 = 0;
        let mut out_batch: u32 = 0;
        let mut first = true;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first {
                    0
                } else {
                    &in_batch as *const u32 as u64
                },
                out_batch: &mut out_batch as *mut u32 as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: CHUNK_ENTRIES as u32,
                map_fd: self.fd.as_raw_fd() as u32,
                elem_flags: 0,
                flags: 0,
            };
            // SAFETY: attr points at buffers sized for `count` keys and values
            // (values are u64, already 8-byte rounded, times possible CPUs).
            let r = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &mut attr as *mut BatchAttr,
                    std::mem::size_of::<BatchAttr>() as u32,
                )
            };
            let error = (r < 0).then(io::Error::last_os_error);
            let filled = attr.count as usize;
            for i in 0..filled {
                let key = &self.keys[i * self.key_size..(i + 1) * self.key_size];
                let values = &self.values[i * self.possible_cpus..(i + 1) * self.possible_cpus];
                each(key, values);
            }
            match error {
                None => {}
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Some(e) => return Err(e),
            }
            in_batch = out_batch;
            first = false;
        }
    }
}
