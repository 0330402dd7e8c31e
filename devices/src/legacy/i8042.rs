use std::sync::Arc;

use super::{ExitRequest, GuestExit};
use crate::bus::BusDevice;

/// Offset of the command/status port (0x64) from the data port (0x60).
const COMMAND_OFFSET: u64 = 4;
/// "Pulse output line 0": the CPU reset that Linux's `reboot=k` uses.
const CMD_RESET_CPU: u8 = 0xfe;

/// Just enough of the i8042 keyboard controller for a guest reboot: the
/// guest sees an empty controller, and a reset command ends the run.
pub struct I8042 {
    exit: Arc<dyn ExitRequest>,
}

impl I8042 {
    pub fn new(exit: Arc<dyn ExitRequest>) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: no data to read, input buffer empty, so the guest
        // never waits on us.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.exit.request_exit(GuestExit::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::super::ExitPort;
    use super::*;

    #[derive(Default)]
    struct Record(Mutex<Vec<GuestExit>>);
    impl ExitRequest for Record {
        fn request_exit(&self, exit: GuestExit) {
            self.0.lock().unwrap().push(exit);
        }
    }

    #[test]
    fn reset_command_requests_exit() {
        let rec = Arc::new(Record::default());
        let mut dev = I8042::new(rec.clone());
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0], 0);
        dev.write(0, &[CMD_RESET_CPU]); // data port: ignored
        dev.write(COMMAND_OFFSET, &[0xd1]); // other command: ignored
        assert!(rec.0.lock().unwrap().is_empty());
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(*rec.0.lock().unwrap(), vec![GuestExit::Reset]);
    }

    #[test]
    fn exit_port_passes_the_status_byte() {
        let rec = Arc::new(Record::default());
        let mut dev = ExitPort::new(rec.clone());
        dev.write(0, &[]);
        dev.write(0, &[3]);
        dev.write(0, &[0x2a, 0x01, 0, 0]);
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![GuestExit::Status(3), GuestExit::Status(0x2a)]
        );
    }
}
