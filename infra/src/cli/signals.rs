//! Ctrl-C (SIGINT), SIGTERM and SIGHUP (the terminal closed) for `herd up`: caught from the very
//! start, so a signal that arrives while the cluster is still starting stops what has started
//! instead of killing herd and orphaning its children (they run in their own process groups and
//! would not see the terminal's Ctrl-C themselves).

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use super::CliError;

/// Which stop signal has arrived, if any; cheap to clone, and readable from blocking threads.
#[derive(Debug, Clone)]
pub(crate) struct StopSignal {
    received: watch::Receiver<Option<&'static str>>,
}

impl StopSignal {
    /// Installs the handlers now (from then on SIGINT and SIGTERM no longer end the process) and
    /// watches for them on a task. Must be called inside the tokio runtime.
    pub(crate) fn install() -> Result<Self, CliError> {
        let os = |source| CliError::Os {
            what: "install signal handlers",
            source,
        };
        // `signal` registers at once; `tokio::signal::ctrl_c()` would only register when first
        // polled, leaving a window in which Ctrl-C still kills herd.
        let mut interrupt = signal(SignalKind::interrupt()).map_err(os)?;
        let mut terminate = signal(SignalKind::terminate()).map_err(os)?;
        let mut hangup = signal(SignalKind::hangup()).map_err(os)?;
        let (sender, received) = watch::channel(None);
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
                _ = hangup.recv() => "SIGHUP",
            };
            let _ = sender.send(Some(name));
            // Keep the handlers installed (and further signals swallowed) while we stop the
            // cluster: a second Ctrl-C must not abandon a half-stopped cluster.
            loop {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                    _ = hangup.recv() => {}
                }
            }
        });
        Ok(StopSignal { received })
    }

    /// The signal received so far, if any.
    pub(crate) fn received(&self) -> Option<&'static str> {
        *self.received.borrow()
    }

    /// Waits for a stop signal and returns its name.
    pub(crate) async fn wait(&mut self) -> &'static str {
        match self.received.wait_for(Option::is_some).await {
            Ok(name) => name.unwrap_or("a signal"),
            // The watching task is gone only when the runtime shuts down.
            Err(_) => "shutdown",
        }
    }
}
