use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::{Serial, Trigger};

use crate::bus::BusDevice;
use crate::Interrupt;

/// Adapts the VMM's interrupt line to vm-superio's trigger.
pub struct IrqTrigger(Arc<dyn Interrupt>);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// A 16550 UART (vm-superio) whose output goes to `out` and whose input the
/// VMM feeds from its stdin.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    pub fn new(irq: Arc<dyn Interrupt>, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fitted in
    /// the receive FIFO (the rest must be offered again later).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has 8 byte-wide registers; wider accesses see the one
        // register at the offset, as on real hardware's data bus low byte.
        let value = u8::try_from(offset).map_or(0xff, |o| self.uart.read(o));
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(o), Some(&v)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.uart.write(o, v) {
                log::debug!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Interrupt for Count {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_the_sink_and_input_raises_irq() {
        let irq = Arc::new(Count::default());
        let sink = Sink::default();
        let mut s = SerialConsole::new(irq.clone(), Box::new(sink.clone()));
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        // Enable the received-data interrupt (IER bit 0), then feed input.
        s.write(1, &[1]);
        assert_eq!(s.enqueue_input(b"x"), 1);
        assert!(irq.0.load(Ordering::SeqCst) >= 1);
        let mut b = [0u8; 1];
        s.read(0, &mut b);
        assert_eq!(b[0], b'x');
        // Out-of-range offsets are ignored, not fatal.
        s.write(0x1_0000, &[1]);
        s.read(u64::MAX, &mut b);
        assert_eq!(b[0], 0xff);
    }
}
