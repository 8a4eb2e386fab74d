//! The background tasks of a running server, and the order they stop in.

use tokio::task::JoinHandle;

/// Owns the background tasks a server starts (upkeep, health, warm start, key and policy
/// reloads) and stops them together, newest first, once the server no longer serves.
///
/// Two tasks live outside it because they stop at their own moments: the health task
/// stops when draining begins (so it cannot report SERVING again), and the change feed
/// stops last, after the store is closed (so no cached answer outlives its invalidation).
#[derive(Default)]
pub(super) struct Supervisor {
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Supervisor {
    /// Starts `task` under the name `name`.
    pub(super) fn spawn(
        &mut self,
        name: &'static str,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        self.adopt(name, tokio::spawn(task));
    }

    /// Takes over a task started elsewhere (the reload watchers start their own).
    pub(super) fn adopt(&mut self, name: &'static str, task: JoinHandle<()>) {
        self.tasks.push((name, task));
    }

    /// Stops every task, newest first.
    pub(super) fn stop(self) {
        for (name, task) in self.tasks.into_iter().rev() {
            task.abort();
            tracing::debug!(task = name, "stopped");
        }
    }
}
