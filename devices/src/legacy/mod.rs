//! The legacy PC pieces a Linux guest needs: a 16550 console, the i8042
//! reset line and pmemvm's exit port.

mod exit_port;
mod i8042;
mod serial;

pub use exit_port::{ExitPort, EXIT_PORT};
pub use i8042::I8042;
pub use serial::SerialConsole;

/// Why the guest wants pmemvm to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest rebooted (i8042 reset or triple fault): a clean end, status 0.
    Reset,
    /// The guest wrote this status to the exit port.
    Status(u8),
}

/// How devices ask the VMM to end the run.
pub trait ExitRequest: Send + Sync {
    fn request_exit(&self, exit: GuestExit);
}
