//! Interrupts of a long lab command: Ctrl-C, SIGTERM and SIGHUP end it at
//! its next step with [`LabError::Interrupted`] instead of killing it.

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use super::{io_err, LabError, Result};

/// Set by the signal handler of [`InterruptGuard`].
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The signals a long lab command turns into [`LabError::Interrupted`].
const INTERRUPTS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

extern "C" fn note_interrupt(_: libc::c_int) {
    // Only an atomic store: all a signal handler may safely do here.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// While alive, Ctrl-C (SIGINT), SIGTERM and SIGHUP no longer kill the
/// process: they end the running lab command at its next step with
/// [`LabError::Interrupted`], so that `lab up` removes what it built instead
/// of leaving namespaces and daemons behind. Dropping it restores the
/// previous handlers.
pub struct InterruptGuard {
    previous: Vec<(Signal, SigAction)>,
}

impl InterruptGuard {
    pub fn install() -> Result<InterruptGuard> {
        INTERRUPTED.store(false, Ordering::SeqCst);
        let action = SigAction::new(
            SigHandler::Handler(note_interrupt),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let mut guard = InterruptGuard {
            previous: Vec::new(),
        };
        for sig in INTERRUPTS {
            // SAFETY: the handler only stores to an atomic.
            let old = unsafe { sigaction(sig, &action) }
                .map_err(|e| io_err(format!("installing a {sig} handler"))(e.into()))?;
            guard.previous.push((sig, old));
        }
        Ok(guard)
    }
}

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        for (sig, old) in self.previous.drain(..) {
            // SAFETY: puts back the handler that was there before.
            let _ = unsafe { sigaction(sig, &old) };
        }
    }
}

/// Whether an interrupt arrived while an [`InterruptGuard`] was alive.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub(crate) fn check_interrupted() -> Result<()> {
    if interrupted() {
        Err(LabError::Interrupted)
    } else {
        Ok(())
    }
}
