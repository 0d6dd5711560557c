//! pvpanic (`--pvpanic`): the PCI device through which a guest kernel tells
//! the host it panicked (QEMU's `pvpanic-pci`, which Linux's pvpanic-pci
//! driver binds to). Its one BAR holds a byte: reads give the events the
//! device knows, a write reports one. Each report becomes Cloud
//! Hypervisor's event-monitor event `guest` `panic` with `event` =
//! `panic`, `crash_loaded` or `unknown_event`.

use std::time::{Duration, Instant};

use crate::pci::config::{Bar, BarKind, PciConfiguration, PciIdentity};
use crate::pci::PciDevice;
use crate::virtio::pci::DeviceEvents;

/// Red Hat's vendor id and QEMU's pvpanic-pci device id, as CH uses them.
const VENDOR: u16 = 0x1b36;
const DEVICE: u16 = 0x0011;
/// Base class "base system peripheral", subclass "other".
const CLASS: (u8, u8, u8) = (0x08, 0x80, 0x00);
/// Cloud Hypervisor's BAR: 2 bytes, placed 16-byte aligned.
pub const BAR_SIZE: u64 = 2;
pub const BAR_ALIGNMENT: u64 = 0x10;

/// The guest panicked and the host should handle it.
const PANICKED: u8 = 1 << 0;
/// The guest panicked and loaded a crash kernel (kdump) itself.
const CRASH_LOADED: u8 = 1 << 1;

/// Reports a guest may make per second: a guest writing the register in a
/// loop must not turn the VMM into an event-monitor log writer.
const REPORTS_PER_SECOND: u32 = 64;

pub struct PvPanic {
    config: PciConfiguration,
    events: DeviceEvents,
    window_start: Instant,
    reports_in_window: u32,
    dropped: u64,
}

impl PvPanic {
    /// The device with its BAR at `bar_address` (32-bit, segment 0).
    pub fn new(events: DeviceEvents, bar_address: u64) -> PvPanic {
        let mut config = PciConfiguration::new(PciIdentity {
            vendor: VENDOR,
            device: DEVICE,
            class: CLASS,
            revision: 1,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        config.add_bar(
            0,
            bar_address,
            Bar {
                size: BAR_SIZE,
                kind: BarKind::Memory32,
                prefetchable: false,
            },
        );
        // Decoding on from the start, as Cloud Hypervisor has it (I/O,
        // memory and SERR# enable): a kernel that does not enable the
        // device before panicking still reaches it.
        config.write_register(1, 0, &[0x03, 0x01]);
        PvPanic {
            config,
            events,
            window_start: Instant::now(),
            reports_in_window: 0,
            dropped: 0,
        }
    }

    /// Cloud Hypervisor's name for what the guest wrote.
    pub fn event_name(value: u8) -> &'static str {
        match value {
            PANICKED => "panic",
            CRASH_LOADED => "crash_loaded",
            _ => "unknown_event",
        }
    }

    /// Whether one more report fits in this second.
    fn admit(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            if self.dropped > 0 {
                log::warn!(
                    "pvpanic: {} guest reports dropped (more than {REPORTS_PER_SECOND} a second)",
                    self.dropped
                );
            }
            self.window_start = now;
            self.reports_in_window = 0;
            self.dropped = 0;
        }
        if self.reports_in_window < REPORTS_PER_SECOND {
            self.reports_in_window += 1;
            true
        } else {
            self.dropped += 1;
            false
        }
    }

    /// The configuration registers, for a snapshot.
    pub fn save_state(&self) -> Vec<u32> {
        self.config.registers().to_vec()
    }

    /// Loads what `save_state` gave (the BAR where the guest put it).
    pub fn restore_state(&mut self, registers: &[u32]) -> bool {
        self.config.restore_registers(registers)
    }
}

impl PciDevice for PvPanic {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write_register(reg, offset, data);
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(first) = data.first_mut() {
                *first = PANICKED | CRASH_LOADED;
            }
        }
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        let (0, Some(&value)) = (offset, data.first()) else {
            return;
        };
        if !self.admit() {
            return;
        }
        let event = Self::event_name(value);
        log::info!("pvpanic: the guest reported {event} ({value:#x})");
        self.events
            .push("guest", "panic", vec![("event", event.to_owned())]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::pci::DeviceEventLog;
    use std::sync::Arc;

    fn device() -> (PvPanic, DeviceEvents) {
        let events: DeviceEvents = Arc::new(DeviceEventLog::new().unwrap());
        (PvPanic::new(events.clone(), 0xe7ff_fff0), events)
    }

    fn reported(events: &DeviceEvents) -> Vec<String> {
        events
            .since(0)
            .0
            .into_iter()
            .map(|e| {
                assert_eq!((e.source, e.event), ("guest", "panic"));
                assert_eq!(e.properties.len(), 1);
                assert_eq!(e.properties[0].0, "event");
                e.properties[0].1.clone()
            })
            .collect()
    }

    #[test]
    fn identity_and_bar_are_cloud_hypervisors() {
        let (device, _) = device();
        let config = device.config();
        assert_eq!(config.read_register(0), 0x0011_1b36);
        assert_eq!(config.read_register(2), 0x0880_0001, "class and revision");
        assert_eq!(config.read_register(1) & 0xffff, 0x0103, "command");
        assert_eq!(config.bar_address(0), Some(0xe7ff_fff0));
        assert_eq!(config.bar(0).map(|b| b.size), Some(2));
        assert_eq!(config.memory_bar_at(0xe7ff_fff1), Some((0, 1)));
        assert_eq!(config.memory_bar_at(0xe7ff_fff2), None);
    }

    #[test]
    fn the_guest_reads_the_supported_events_and_reports_one() {
        let (mut device, events) = device();
        let mut data = [0xffu8; 4];
        device.bar_read(0, 0, &mut data);
        assert_eq!(data, [3, 0, 0, 0]);
        device.bar_read(0, 1, &mut data[..1]);
        assert_eq!(data[0], 0);
        device.bar_write(0, 0, &[1]);
        device.bar_write(0, 0, &[2]);
        device.bar_write(0, 0, &[3]);
        device.bar_write(0, 0, &[0]);
        device.bar_write(0, 0, &[]);
        device.bar_write(0, 1, &[1]);
        assert_eq!(
            reported(&events),
            ["panic", "crash_loaded", "unknown_event", "unknown_event"]
        );
    }

    #[test]
    fn a_guest_writing_in_a_loop_is_held_to_the_rate() {
        let (mut device, events) = device();
        for _ in 0..10_000 {
            device.bar_write(0, 0, &[1]);
        }
        let count = reported(&events).len();
        // Within one second only the budget passes (two windows at most if
        // the loop straddled a second).
        assert!(
            (REPORTS_PER_SECOND as usize..=2 * REPORTS_PER_SECOND as usize).contains(&count),
            "{count} reports"
        );
    }

    #[test]
    fn the_bar_survives_a_snapshot_where_the_guest_moved_it() {
        let (mut device, _) = device();
        device.config_write(4, 0, &0xd000_0000u32.to_le_bytes());
        let saved = device.save_state();
        let (mut restored, _) = self::device();
        assert!(restored.restore_state(&saved));
        assert_eq!(restored.config().bar_address(0), Some(0xd000_0000));
        assert!(!restored.restore_state(&saved[..10]));
    }
}
