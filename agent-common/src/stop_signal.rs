//! How every long-running sci-cf binary learns it must stop: SIGINT or
//! SIGTERM. The handlers are installed when [`stop_signal`] is called, not
//! when its future is first polled, so a binary that calls it before saying
//! it is ready (a `listening ADDR` line, a health endpoint) never dies of a
//! SIGTERM's default action in the gap between the two. That gap was real:
//! under CPU load the service answered a whole exchange on its worker
//! thread before its accept loop first polled the lazy future, and the
//! SIGTERM that followed killed it (exit by signal 15, 1 run in 150).

/// Installs SIGINT and SIGTERM handlers now (inside a tokio runtime) and
/// returns the future that resolves at the first of either.
pub fn stop_signal() -> std::io::Result<impl core::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::stop_signal;

    #[test]
    fn a_sigterm_raised_before_the_first_poll_is_caught() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let stop = runtime.block_on(async { stop_signal() }).expect("handlers");
        // SAFETY: signalling this very process, whose SIGTERM is now handled.
        assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGTERM) }, 0);
        let caught = runtime.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(5), stop).await
        });
        assert!(caught.is_ok(), "the SIGTERM was not seen within 5 s");
    }
}
