use std::sync::Arc;

use super::{ExitRequest, GuestExit};
use crate::bus::BusDevice;

/// The I/O port through which the guest picks pmemvm's exit status: a one-byte
/// write of N ends pmemvm with status N. The same port as QEMU's
/// isa-debug-exit, but the value is used as it is.
pub const EXIT_PORT: u16 = 0xf4;

pub struct ExitPort {
    exit: Arc<dyn ExitRequest>,
}

impl ExitPort {
    pub fn new(exit: Arc<dyn ExitRequest>) -> Self {
        Self { exit }
    }
}

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Only the low byte of a write at the port itself counts; wider
        // writes still end the run, with their low byte.
        if offset == 0 {
            if let Some(&status) = data.first() {
                self.exit.request_exit(GuestExit::Status(status));
            }
        }
    }
}
