//! How a process of the system learns it should stop. The ingress, the sequencer and the
//! benchmark's baseline servers each finish their in-flight work when this resolves.

use tokio::signal::unix::{signal, SignalKind};

/// Resolves on the first SIGTERM (what `scripts/down`, supervisors and the drills send) or
/// Ctrl-C. Installing the handler fails only when the runtime has no signal driver, a bug
/// of the caller's runtime set-up, hence the panic.
pub async fn requested() {
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
