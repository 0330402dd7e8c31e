//! How the run ends: the first reason any thread reports wins, and the main
//! thread, waiting on an eventfd, turns it into pmemvm's exit status.

use std::sync::Mutex;

use devices::legacy::{ExitRequest, GuestExit};
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    Guest(GuestExit),
    /// The guest cannot go on (emulation failure, failed entry, ...): the
    /// text says what happened, with the vCPU state where useful.
    Fault(String),
}

impl RunEnd {
    /// The process exit status for this end.
    pub fn status(&self) -> i32 {
        match self {
            RunEnd::Guest(GuestExit::Reset) => 0,
            RunEnd::Guest(GuestExit::Status(s)) => i32::from(*s),
            RunEnd::Fault(_) => 1,
        }
    }
}

pub struct ExitSignal {
    end: Mutex<Option<RunEnd>>,
    evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            end: Mutex::new(None),
            evt: EventFd::new(libc::EFD_CLOEXEC)?,
        })
    }

    pub fn end(&self, reason: RunEnd) {
        let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
        if end.is_none() {
            *end = Some(reason);
            if let Err(e) = self.evt.write(1) {
                log::error!("cannot signal the end of the run: {e}");
            }
        }
    }

    pub fn is_ended(&self) -> bool {
        self.end.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Blocks until some thread ends the run.
    pub fn wait(&self) -> RunEnd {
        loop {
            if let Some(end) = self.end.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                return end;
            }
            if let Err(e) = self.evt.read() {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    log::error!("waiting for the end of the run: {e}");
                }
            }
        }
    }
}

impl ExitRequest for ExitSignal {
    fn request_exit(&self, exit: GuestExit) {
        self.end(RunEnd::Guest(exit));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        assert!(!s.is_ended());
        s.request_exit(GuestExit::Status(7));
        s.end(RunEnd::Fault("later".into()));
        s.request_exit(GuestExit::Reset);
        assert_eq!(s.wait(), RunEnd::Guest(GuestExit::Status(7)));
        assert_eq!(s.wait().status(), 7);
        assert_eq!(RunEnd::Guest(GuestExit::Reset).status(), 0);
        assert_eq!(RunEnd::Fault(String::new()).status(), 1);
    }
}
