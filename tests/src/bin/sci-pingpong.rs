//! A request/response pair for tests: the process forks (without exec) a
//! server child; the client writes a request byte into one pipe, the server
//! spins for `--work-us` of its own CPU time and answers through another,
//! the client spins as long again and sends the next request, until killed.
//!
//! `sci-pingpong [--work-us N] [--rename NAME --rename-after-ms M]`: with
//! `--rename`, the server child renames itself (`prctl(PR_SET_NAME)`) after
//! M ms, as services that name their workers do.
use std::io::{Read, Write};

use sci_tests::spin::spin_thread_cpu_ns;

/// Spins for `us` of this thread's CPU time.
fn spin_us(us: u64) {
    spin_thread_cpu_ns(us * 1000, 50);
}

#[derive(clap::Parser)]
struct Args {
    /// CPU time each side spends per request.
    #[arg(long, default_value_t = 20)]
    work_us: u64,
    /// The server child's new name.
    #[arg(long)]
    rename: Option<String>,
    #[arg(long, default_value_t = 0)]
    rename_after_ms: u64,
}

fn main() {
    let Args {
        work_us,
        rename,
        rename_after_ms,
    } = clap::Parser::parse();
    let (mut request_read, mut request_write) = std::io::pipe().expect("pipe");
    let (mut response_read, mut response_write) = std::io::pipe().expect("pipe");
    // SAFETY: single-threaded here; the child only uses its own copies.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork failed");
    let mut byte = [0u8; 1];
    if child == 0 {
        drop(request_write);
        drop(response_read);
        // The server dies with its client.
        // SAFETY: plain prctl calls.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        let started = std::time::Instant::now();
        let mut renamed = rename.is_none();
        while request_read.read_exact(&mut byte).is_ok() {
            if !renamed && started.elapsed().as_millis() as u64 >= rename_after_ms {
                if let Some(name) = &rename {
                    let mut bytes = name.as_bytes().to_vec();
                    bytes.truncate(15);
                    bytes.push(0);
                    // SAFETY: a NUL-terminated name of at most 16 bytes.
                    unsafe { libc::prctl(libc::PR_SET_NAME, bytes.as_ptr()) };
                }
                renamed = true;
            }
            spin_us(work_us);
            if response_write.write_all(&byte).is_err() {
                break;
            }
        }
        std::process::exit(0);
    }
    drop(request_read);
    drop(response_write);
    loop {
        if request_write.write_all(&[1]).is_err() || response_read.read_exact(&mut byte).is_err() {
            break;
        }
        spin_us(work_us);
    }
}
