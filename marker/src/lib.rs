//! Business-scenario markers that the sci-cf agent follows with uprobes.
//!
//! A service calls `sci_scenario_begin(code)` when a thread starts serving one
//! flow of a scenario and `sci_scenario_end(code, ok)` when the flow is done.
//! The agent attaches uprobes to these two symbols (argument 0 = scenario code,
//! argument 1 = ok): between the two calls the thread's CPU time is charged to
//! the scenario, and an `end` with `ok != 0` is one completed transaction.
//! Without the agent the calls cost two atomic increments.
//!
//! The functions are exported, never inlined and not empty (each updates a
//! process-local counter), so the symbols exist in `libsci_marker.so` and in
//! any binary that links this crate as an rlib. The counters
//! (`sci_scenario_begun`, `sci_scenario_completed`, `sci_scenario_failed`)
//! are the process's own ground truth.
use std::ffi::{c_char, c_int, CStr};
use std::sync::atomic::{AtomicU64, Ordering};

/// The scenario vocabulary (names, slots, weights) is agent-common's.
pub use agent_common::scenario::Scenario;

/// Scenario codes: the agent's slot numbers (`include/sci_marker.h` repeats
/// them for C; `tests/header.rs` checks it against these).
pub const SCI_NONE: u32 = agent_common::SCENARIO_NONE;
pub const SCI_CREDIT: u32 = agent_common::SCENARIO_CREDIT;
pub const SCI_DRAWDOWN: u32 = agent_common::SCENARIO_DRAWDOWN;
pub const SCI_REPAYMENT: u32 = agent_common::SCENARIO_REPAYMENT;
pub const SCI_QUERY: u32 = agent_common::SCENARIO_QUERY;
const SLOTS: usize = agent_common::SCENARIO_SLOTS as usize;

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
static BEGUN: [AtomicU64; SLOTS] = [ZERO; SLOTS];
static COMPLETED: [AtomicU64; SLOTS] = [ZERO; SLOTS];
static FAILED: [AtomicU64; SLOTS] = [ZERO; SLOTS];

/// Out-of-range codes are counted in slot 0 (`SCI_NONE`).
fn slot(scenario: u32) -> usize {
    let s = scenario as usize;
    if s < SLOTS {
        s
    } else {
        0
    }
}

/// Puts a `nop` at the very start of a marker function. The kernel emulates a
/// uprobe on a `nop` (one trap); on any other first instruction (here a store)
/// it must single-step a copy of it out of line (two traps), which costs
/// several times more.
#[inline(always)]
fn uprobe_landing_pad() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a nop touches nothing.
    unsafe {
        core::arch::asm!("nop", options(nomem, nostack, preserves_flags));
    }
}

/// A thread starts serving one flow of `scenario` (1..=4).
#[no_mangle]
#[inline(never)]
pub extern "C" fn sci_scenario_begin(scenario: u32) {
    uprobe_landing_pad();
    let scenario = std::hint::black_box(scenario);
    BEGUN[slot(scenario)].fetch_add(1, Ordering::Relaxed);
}

/// The flow of `scenario` ends; `ok != 0` counts it as a completed transaction.
#[no_mangle]
#[inline(never)]
pub extern "C" fn sci_scenario_end(scenario: u32, ok: c_int) {
    uprobe_landing_pad();
    let (scenario, ok) = std::hint::black_box((scenario, ok));
    let counters = if ok != 0 { &COMPLETED } else { &FAILED };
    counters[slot(scenario)].fetch_add(1, Ordering::Relaxed);
}

/// Code of a scenario name (`credit`, `drawdown`, `repayment`, `query`, or the
/// standard's Chinese names 授信, 支用, 还款, 查询); None when unknown.
pub fn scenario_code(name: &str) -> Option<u32> {
    Scenario::from_name(name).map(Scenario::code)
}

/// Begins the scenario named by a NUL-terminated UTF-8 string; returns its
/// code, or -1 (and begins nothing) when the name is unknown or null.
///
/// # Safety
/// `name` must be null or point to a NUL-terminated string.
#[no_mangle]
#[inline(never)]
pub unsafe extern "C" fn sci_scenario_begin_name(name: *const c_char) -> c_int {
    if name.is_null() {
        return -1;
    }
    // SAFETY: the caller passes a NUL-terminated string (checked non-null above).
    let name = unsafe { CStr::from_ptr(name) };
    match name.to_str().ok().and_then(scenario_code) {
        Some(code) => {
            sci_scenario_begin(code);
            code as c_int
        }
        None => -1,
    }
}

/// `begin` calls for `scenario` in this process so far.
#[no_mangle]
pub extern "C" fn sci_scenario_begun(scenario: u32) -> u64 {
    BEGUN[slot(scenario)].load(Ordering::Relaxed)
}

/// `end(scenario, ok != 0)` calls in this process so far.
#[no_mangle]
pub extern "C" fn sci_scenario_completed(scenario: u32) -> u64 {
    COMPLETED[slot(scenario)].load(Ordering::Relaxed)
}

/// `end(scenario, 0)` calls in this process so far.
#[no_mangle]
pub extern "C" fn sci_scenario_failed(scenario: u32) -> u64 {
    FAILED[slot(scenario)].load(Ordering::Relaxed)
}

/// This process's marker counters of a scenario, for the Rust API.
pub trait ScenarioCounters {
    /// `end(ok != 0)` calls so far.
    fn completed(self) -> u64;
    /// `end(ok = 0)` calls so far.
    fn failed(self) -> u64;
    /// `begin` calls so far.
    fn begun(self) -> u64;
}

impl ScenarioCounters for Scenario {
    fn completed(self) -> u64 {
        sci_scenario_completed(self.code())
    }

    fn failed(self) -> u64 {
        sci_scenario_failed(self.code())
    }

    fn begun(self) -> u64 {
        sci_scenario_begun(self.code())
    }
}

/// One flow of a scenario on the current thread: begun on creation, ended
/// with `finish(ok)`; dropped without `finish` (early return, `?`, panic) it
/// ends as failed.
#[derive(Debug)]
#[must_use = "the flow ends (as failed) when the guard is dropped"]
pub struct ScenarioGuard {
    scenario: Scenario,
    ended: bool,
}

impl ScenarioGuard {
    pub fn begin(scenario: Scenario) -> Self {
        sci_scenario_begin(scenario.code());
        ScenarioGuard {
            scenario,
            ended: false,
        }
    }

    pub fn scenario(&self) -> Scenario {
        self.scenario
    }

    /// Ends the flow; `ok = true` counts one completed transaction.
    pub fn finish(mut self, ok: bool) {
        self.ended = true;
        sci_scenario_end(self.scenario.code(), c_int::from(ok));
    }
}

impl Drop for ScenarioGuard {
    fn drop(&mut self) {
        if !self.ended {
            sci_scenario_end(self.scenario.code(), 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_codes_and_unknown_is_refused() {
        for (name, code) in [
            ("credit", 1),
            ("drawdown", 2),
            ("repayment", 3),
            ("query", 4),
            ("授信", 1),
            ("查询", 4),
        ] {
            let c = std::ffi::CString::new(name).expect("no NUL");
            // SAFETY: a valid NUL-terminated string.
            assert_eq!(unsafe { sci_scenario_begin_name(c.as_ptr()) }, code);
        }
        let bad = std::ffi::CString::new("loan").expect("no NUL");
        // SAFETY: valid string and null pointer are both allowed.
        unsafe {
            assert_eq!(sci_scenario_begin_name(bad.as_ptr()), -1);
            assert_eq!(sci_scenario_begin_name(std::ptr::null()), -1);
        }
        assert_eq!(Scenario::from_name("repayment"), Some(Scenario::Repayment));
        assert_eq!(Scenario::from_name("Credit"), None);
    }
}
