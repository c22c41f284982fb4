//! Software prefetch for the window's walks over every live process.
//!
//! A window gives each process record a reference to its description (an
//! `Arc<ProcInfo>` and its strings, scattered on the heap). Between two
//! windows the processes that ran have evicted those lines from the CPU
//! caches, and each reference count is a locked instruction that no later
//! load may overtake, so the misses were taken one after another: at 5,000
//! processes most of the record building's cycles sat on the first touch of
//! a description (perf, AMD EPYC). Asking for the lines a few processes
//! ahead lets the misses overlap. A prefetch is a hint that never faults:
//! no address is dereferenced here.
use std::sync::Arc;

use crate::sources::sched::proc_info::ProcInfo;
use crate::window::Text;

/// How many processes ahead a description is asked for; its strings are
/// asked for half as far ahead, once the description itself has arrived.
pub const PROCESSES_AHEAD: usize = 16;

/// Asks the CPU to bring the cache line at `ptr` in.
#[inline(always)]
pub fn prefetch<T: ?Sized>(ptr: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 reads nothing architecturally and never faults,
    // whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(ptr.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

/// The line of a text's reference counts (they precede the characters).
#[inline(always)]
fn prefetch_text(text: &Text) {
    prefetch(Arc::as_ptr(text).cast::<u8>().wrapping_sub(16));
}

/// Brings in a description.
#[inline(always)]
pub fn prefetch_description(info: &Arc<ProcInfo>) {
    prefetch(Arc::as_ptr(info));
}

/// Brings in the reference counts of a description's strings; reads the
/// description, so it should be in already ([`prefetch_description`]).
#[inline(always)]
pub fn prefetch_description_strings(info: &ProcInfo) {
    prefetch_text(&info.comm);
    for text in [&info.exe, &info.cmdline, &info.cgroup, &info.container_id]
        .into_iter()
        .flatten()
    {
        prefetch_text(text);
    }
}
